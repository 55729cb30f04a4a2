"""Every private Keras / TensorFlow API the Keras front end uses, in one place.

Horovod's own Keras layer broke on Keras 3 because it used private APIs spread over its code.
Here each private API we rely on is one small function; nothing else in
``horovod_local.tensorflow.keras`` touches Keras' private attributes. :func:`verify` probes
them all on a throwaway optimizer (``keras.optimizers.SGD(momentum=0.9)`` on two variables) the
first time any of these functions is used, and raises :class:`KerasCompatError` naming the
private APIs that are gone or changed, the installed Keras version and the versions this module
was checked on.

Policy:

* a probe fails -> :class:`KerasCompatError` (a ``RuntimeError``), whatever the version;
* the probes pass but Keras' ``major.minor`` is not one of :data:`CHECKED_KERAS_VERSIONS` ->
  one ``UserWarning`` (the code is likely fine; nobody has run the tests on that version);
* Keras older than 3 -> :class:`KerasCompatError` (the front end is for Keras 3);
* TensorFlow's private ``control_flow_util`` (only used to refuse XLA-compiled train steps with
  a clear message) gone -> one warning and :func:`in_xla_context` returns False: the guard is a
  diagnostic, training itself does not need it.

To support a new Keras version: run ``pytest tests/test_keras_compat.py`` (and the Keras
tests) on it, fix what fails here, and add the version to :data:`CHECKED_KERAS_VERSIONS`.
"""
from __future__ import annotations

import importlib
import re
import threading
import warnings
from typing import Any, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "CHECKED_KERAS_VERSIONS", "KerasCompatError", "NOT_STATE", "check_keras_version",
    "check_variables_known", "in_xla_context", "iterations", "own_variables", "slot_variables",
    "trainable_variables", "variable_index", "verify",
]

#: Keras versions on which ``tests/test_keras_compat.py`` passed (the probes, and each function
#: doing what the front end needs); a version with the same ``major.minor`` counts as checked.
#: The horovodrun Keras tests (tests/test_keras_optimizer.py) ran on the newest one.
CHECKED_KERAS_VERSIONS: tuple[str, ...] = ("3.12.4", "3.13.2", "3.14.1", "3.15.1")

#: Attributes of Keras optimizers that hold per-variable lists which are NOT optimizer state
#: (the variables themselves, gradient accumulators, EMA copies). An optimizer class can add
#: its own with a ``_hl_not_state`` tuple of attribute names (``LocalAdaAlter`` does).
NOT_STATE = frozenset({"_trainable_variables", "_variables", "_accumulated_gradients",
                       "_model_variables_moving_average"})

_FLOAT = ("float16", "bfloat16", "float32", "float64")

# what each private API is, for the error messages
_API = {
    "_trainable_variables": "Optimizer._trainable_variables (the variables it was built on, "
                            "in order)",
    "_iterations": "Optimizer._iterations (the raw step counter variable)",
    "_get_variable_index": "Optimizer._get_variable_index(variable)",
    "_check_variables_are_known": "Optimizer._check_variables_are_known(variables)",
    "_variables": "Optimizer._variables (the variables the optimizer itself tracks)",
    "slots": "optimizer slot variables as per-variable list attributes (vars(optimizer), e.g. "
             "SGD's momentums)",
}


class KerasCompatError(RuntimeError):
    """A private Keras API the Keras front end of horovod_local relies on is gone or changed."""


def _keras_version() -> str:
    return str(getattr(keras, "__version__", "unknown"))


def _major_minor(version: str) -> Optional[tuple[int, int]]:
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _checked_on() -> str:
    return ", ".join(CHECKED_KERAS_VERSIONS)


def _error(apis: Sequence[str], details: Sequence[str]) -> KerasCompatError:
    names = "; ".join(_API.get(a, a) for a in apis)
    lines = "\n".join(f"  - {d}" for d in details)
    return KerasCompatError(
        f"horovod_local: Keras {_keras_version()} does not provide the private Keras API(s) "
        f"that horovod_local's Keras front end relies on: {names}.\n{lines}\n"
        f"horovod_local's Keras front end was checked on Keras {_checked_on()}. Install one of "
        f"these (e.g. pip install 'keras=={CHECKED_KERAS_VERSIONS[-1]}'), or adapt "
        f"horovod_local/tensorflow/keras/_compat.py to this Keras version.")


# ---- version check and probes -----------------------------------------------------------
_lock = threading.RLock()
_state: dict[str, Any] = {"verified": False, "error": None}


def check_keras_version(version: Optional[str] = None) -> bool:
    """True if ``version`` (default: the installed Keras) has the ``major.minor`` of one of
    :data:`CHECKED_KERAS_VERSIONS`; False for another Keras 3+ version (the caller warns if the
    probes pass); :class:`KerasCompatError` for Keras < 3."""
    version = _keras_version() if version is None else version
    mm = _major_minor(version)
    if mm is not None and mm[0] < 3:
        raise KerasCompatError(
            f"horovod_local's Keras front end needs Keras 3 (checked on Keras {_checked_on()}); "
            f"found Keras {version}")
    checked = {_major_minor(v) for v in CHECKED_KERAS_VERSIONS}
    return mm is not None and mm in checked


def _probe() -> list[tuple[str, str]]:
    """Exercise every private API on a throwaway SGD(momentum=0.9) over two variables of
    different shapes; returns (api, what went wrong) pairs (empty: all good)."""
    fails: list[tuple[str, str]] = []
    a = keras.Variable(np.zeros((2,), "float32"), name="hl_compat_probe_a")
    b = keras.Variable(np.zeros((3, 1), "float32"), name="hl_compat_probe_b")
    unknown = keras.Variable(np.zeros((1,), "float32"), name="hl_compat_probe_unknown")
    opt = keras.optimizers.SGD(learning_rate=0.5, momentum=0.9, name="hl_compat_probe")
    opt.build([a, b])

    tv = getattr(opt, "_trainable_variables", None)
    if not (isinstance(tv, (list, tuple)) and len(tv) == 2 and tv[0] is a and tv[1] is b):
        fails.append(("_trainable_variables",
                      f"expected the list [a, b] the optimizer was built on, got {tv!r:.200}"))

    it = getattr(opt, "_iterations", None)
    if not (_is_variable(it) and tuple(it.shape) == ()
            and tf.as_dtype(it.dtype).is_integer and it is opt.iterations):
        fails.append(("_iterations", f"expected a scalar integer variable that "
                                     f"`optimizer.iterations` returns, got {it!r:.200}"))

    try:
        idx = (opt._get_variable_index(a), opt._get_variable_index(b))
        if idx != (0, 1):
            fails.append(("_get_variable_index", f"expected indices (0, 1), got {idx}"))
    except Exception as e:  # noqa: BLE001 - any failure is what we report
        fails.append(("_get_variable_index", f"{type(e).__name__}: {e}"))

    try:
        opt._check_variables_are_known([b, a])
        try:
            opt._check_variables_are_known([unknown])
            fails.append(("_check_variables_are_known",
                          "accepted a variable the optimizer was not built on"))
        except ValueError:
            pass
    except Exception as e:  # noqa: BLE001
        fails.append(("_check_variables_are_known", f"{type(e).__name__}: {e}"))

    own = getattr(opt, "_variables", None)
    if not (isinstance(own, (list, tuple)) and own
            and [id(v) for v in own] == [id(v) for v in opt.variables]):
        fails.append(("_variables", f"expected the list `optimizer.variables` copies, got "
                                    f"{own!r:.200}"))

    try:
        slots = slot_variables(opt, [a, b], _verify=False)
        shapes = [[tuple(s.shape) for s in per_var] for per_var in slots]
        if shapes != [[(2,)], [(3, 1)]]:
            fails.append(("slots", f"expected one momentum slot of each variable's shape, "
                                   f"found slot shapes {shapes}"))
        elif not fails:
            # the slots found must be the ones the update uses: one step from zero momentum
            # gives momentum = -lr * g (only if the APIs above are there: apply uses them)
            opt.apply([tf.ones((2,)), tf.ones((3, 1))], [a, b])
            got = [float(_np(per_var[0]).ravel()[0]) for per_var in slots]
            if not np.allclose(got, [-0.5, -0.5]):
                fails.append(("slots", f"the slot variables found are not the momentum SGD "
                                       f"updates (expected -0.5 after one step, got {got})"))
            if int(_np(it)) != 1:
                fails.append(("_iterations", f"expected 1 after one apply(), got "
                                             f"{int(_np(it))}"))
    except Exception as e:  # noqa: BLE001
        fails.append(("slots", f"{type(e).__name__}: {e}"))
    return fails


def verify() -> None:
    """Probe every private API once (idempotent, cheap after the first call; callable eagerly
    or while a ``tf.function`` is traced). Raises :class:`KerasCompatError` naming the missing
    or changed private APIs, the Keras version and :data:`CHECKED_KERAS_VERSIONS`; warns once
    if the probes pass on a Keras version not in that list."""
    if _state["verified"]:
        return
    with _lock:
        if _state["verified"]:
            return
        if _state["error"] is not None:
            raise KerasCompatError(_state["error"])
        checked = check_keras_version()
        # eager, also when first used inside a traced function; Keras' own warnings (e.g. a
        # DeprecationWarning under -W error) are not the probes' business
        with tf.init_scope(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fails = _probe()
        if fails:
            err = _error(list(dict.fromkeys(api for api, _ in fails)),
                         [f"{_API.get(api, api)}: {why}" for api, why in fails])
            _state["error"] = str(err)
            raise err
        if not checked:
            warnings.warn(
                f"horovod_local: Keras {_keras_version()} is not one of the versions its Keras "
                f"front end was checked on ({_checked_on()}); the probes of the private Keras "
                f"APIs it uses passed, so it should work. Please run tests/test_keras_compat.py "
                f"and the Keras tests on it.", UserWarning, stacklevel=3)
        _xla_util()  # warns once if TF's private control_flow_util is gone
        _state["verified"] = True


def _reset_for_tests() -> None:
    """Forget the result of :func:`verify` (tests that fake another Keras)."""
    _state["verified"] = False
    _state["error"] = None
    _xla_state.clear()


def _get(opt, attr: str):
    verify()
    try:
        return getattr(opt, attr)
    except AttributeError as e:
        raise _error([attr], [f"{type(opt).__name__} has no attribute {attr!r}"]) from e


def _is_variable(x) -> bool:
    return isinstance(x, (keras.Variable, tf.Variable))


def _np(x) -> np.ndarray:
    return np.asarray(tf.convert_to_tensor(x))


def _dtype_name(dtype) -> str:
    return tf.as_dtype(dtype).name


# ---- the private Keras optimizer APIs ----------------------------------------------------
def trainable_variables(opt) -> list:
    """The variables ``opt`` was built on, in the order of ``opt.build(var_list)`` (a new list).
    Private: ``opt._trainable_variables``."""
    return list(_get(opt, "_trainable_variables"))


def iterations(opt):
    """The raw step counter *variable* of ``opt`` (assignable; not divided by
    ``gradient_accumulation_steps`` as ``opt.iterations`` is). Private: ``opt._iterations``."""
    return _get(opt, "_iterations")


def variable_index(opt, variable) -> int:
    """Position of ``variable`` in the list ``opt`` was built on (KeyError if it was not).
    Private: ``opt._get_variable_index(variable)``."""
    return _get(opt, "_get_variable_index")(variable)


def check_variables_known(opt, variables) -> None:
    """Raise ``ValueError`` if some of ``variables`` is not one ``opt`` was built on (what
    ``Optimizer.apply`` checks). Private: ``opt._check_variables_are_known(variables)``."""
    _get(opt, "_check_variables_are_known")(variables)


def own_variables(opt) -> list:
    """The variables ``opt`` itself created and tracks (its iteration counter, learning rate,
    ``add_variable`` results), without those of wrapped optimizers; a new list. What the base
    ``Optimizer.variables`` returns. Private: ``opt._variables``."""
    return list(_get(opt, "_variables"))


def slot_variables(inner, var_list, _verify: bool = True) -> list[list]:
    """Per variable of ``var_list``, the floating slot variables of its shape that ``inner``
    keeps for it (SGD momentum, Adam m and v, RMSprop velocity ...; empty lists for plain SGD).

    Keras has no public slot API: this scans ``vars(inner)`` (sorted by attribute name) for
    per-variable lists as ``add_optimizer_variables`` builds them, i.e. lists or tuples of
    ``len(var_list)`` whose entries are ``None`` or variables of the matching variable's shape
    with a floating dtype, skipping :data:`NOT_STATE` and the names in ``inner._hl_not_state``.
    """
    if _verify:
        verify()
    n = len(var_list)
    skip = NOT_STATE | set(getattr(inner, "_hl_not_state", ()))
    slots: list[list] = [[] for _ in range(n)]
    try:
        attrs = vars(inner)
    except TypeError as e:
        raise _error(["slots"], [f"{type(inner).__name__} has no instance __dict__"]) from e
    for attr in sorted(attrs):
        val = attrs[attr]
        if attr in skip or not isinstance(val, (list, tuple)) or len(val) != n or n == 0:
            continue
        if not any(_is_variable(x) for x in val):
            continue
        ok = all(x is None or (_is_variable(x) and tuple(x.shape) == tuple(v.shape)
                               and _dtype_name(x.dtype) in _FLOAT)
                 for x, v in zip(val, var_list))
        if not ok:
            continue
        for i, x in enumerate(val):
            if x is not None:
                slots[i].append(x)
    return slots


# ---- private TensorFlow ------------------------------------------------------------------
_TF_CONTROL_FLOW_UTIL = "tensorflow.python.ops.control_flow_util"
_xla_state: dict[str, Any] = {}


def _xla_util():
    """TensorFlow's private ``control_flow_util`` module, or None (warned once) if it moved."""
    if "mod" not in _xla_state:
        try:
            mod = importlib.import_module(_TF_CONTROL_FLOW_UTIL)
            if not callable(getattr(mod, "GraphOrParentsInXlaContext", None)):
                raise ImportError("no GraphOrParentsInXlaContext")
        except ImportError as e:
            mod = None
            warnings.warn(f"horovod_local: TensorFlow {tf.__version__} has no private "
                          f"{_TF_CONTROL_FLOW_UTIL}.GraphOrParentsInXlaContext "
                          f"({e}); XLA-compiled train steps are no longer refused with a clear "
                          f"message (compile with jit_compile=False).", UserWarning, stacklevel=3)
        _xla_state["mod"] = mod
    return _xla_state["mod"]


def in_xla_context() -> bool:
    """True while a graph is built inside an XLA context (``jit_compile=True``, or Keras'
    ``jit_compile='auto'`` on GPU), where Horovod's collectives have no kernels. False eagerly,
    and (after one warning) if TensorFlow's private ``control_flow_util`` is gone. Private:
    ``tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext``."""
    if tf.executing_eagerly():
        return False
    mod = _xla_util()
    return mod is not None and bool(mod.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()))
