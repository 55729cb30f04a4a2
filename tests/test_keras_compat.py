"""The Keras front end's private-API compat module (horovod_local/tensorflow/keras/_compat.py):
its probes pass on the installed Keras, each function does what the front end needs, a missing
private API fails with a message naming it, the Keras version and the checked versions, and no
other module of the front end touches Keras' private APIs. Plain pytest, one process, no
horovodrun."""
from __future__ import annotations

import pathlib
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from horovod_local.tensorflow.keras import LocalAdaAlter, _compat

KERAS_DIR = pathlib.Path(_compat.__file__).parent
# Keras' optimizer base class, only to simulate a Keras without one of the private APIs
BASE_OPTIMIZER = next(c for c in keras.optimizers.SGD.__mro__ if c.__name__ == "BaseOptimizer")


@pytest.fixture(autouse=True)
def _fresh_verify():
    _compat._reset_for_tests()
    yield
    _compat._reset_for_tests()


def _vars(*shapes, dtype="float32"):
    return [keras.Variable(np.full(s, 0.5, dtype), name=f"w{i}") for i, s in enumerate(shapes)]


def _np(x):
    return np.asarray(tf.convert_to_tensor(x))


def _ones_like(vs):
    return [tf.ones(v.shape, v.dtype) for v in vs]


# ---- the installed Keras ------------------------------------------------------------------
def test_probes_pass_on_installed_keras():
    assert _compat._probe() == []
    _compat.verify()
    _compat.verify()  # cached
    assert _compat._state["verified"]


def test_installed_keras_is_a_checked_version():
    if not _compat.check_keras_version():
        pytest.xfail(f"Keras {keras.__version__} is not in CHECKED_KERAS_VERSIONS "
                     f"{_compat.CHECKED_KERAS_VERSIONS}: once this file and the Keras tests pass "
                     f"on it, add it there")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checked version: verify() says nothing
        _compat.verify()


@pytest.mark.parametrize("version,checked", [("3.15.1", True), ("3.15.9", True),
                                             ("3.15.0rc1", True), ("3.12.0", True),
                                             ("3.11.3", False), ("3.99.0", False),
                                             ("4.0.0", False), ("nightly", False)])
def test_check_keras_version(version, checked):
    assert _compat.check_keras_version(version) is checked


def test_keras_2_is_refused():
    with pytest.raises(_compat.KerasCompatError, match=r"needs Keras 3.*found Keras 2\.15\.0"):
        _compat.check_keras_version("2.15.0")


# ---- each function -------------------------------------------------------------------------
def test_trainable_variables_index_and_known():
    vs = _vars((2,), (3, 1), (4,))
    opt = keras.optimizers.SGD(0.1)
    opt.build(vs)
    tv = _compat.trainable_variables(opt)
    assert [id(v) for v in tv] == [id(v) for v in vs]
    tv.append("not kept")  # a new list each time
    assert len(_compat.trainable_variables(opt)) == 3
    assert [_compat.variable_index(opt, v) for v in reversed(vs)] == [2, 1, 0]
    _compat.check_variables_known(opt, [vs[2], vs[0]])
    with pytest.raises(ValueError, match="Unknown variable"):
        _compat.check_variables_known(opt, _vars((2,)))
    with pytest.raises(KeyError):
        _compat.variable_index(opt, _vars((2,))[0])


def test_iterations_is_the_raw_assignable_counter():
    vs = _vars((2,))
    opt = keras.optimizers.SGD(0.1)
    opt.apply(_ones_like(vs), vs)
    opt.apply(_ones_like(vs), vs)
    it = _compat.iterations(opt)
    assert it is opt.iterations and int(_np(it)) == 2
    it.assign_add(1)
    assert int(_np(opt.iterations)) == 3
    acc = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    for _ in range(4):
        acc.apply(_ones_like(vs), vs)
    assert int(_np(_compat.iterations(acc))) == 4  # micro-steps
    assert int(_np(acc.iterations)) == 2


def test_own_variables_excludes_wrapped_ones():
    vs = _vars((2,))
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(vs)
    own = _compat.own_variables(opt)
    assert [id(v) for v in own] == [id(v) for v in opt.variables]
    assert any(v is _compat.iterations(opt) for v in own)
    own.clear()
    assert _compat.own_variables(opt)


def _slot_names(opt, vs):
    slots = _compat.slot_variables(opt, vs)
    assert len(slots) == len(vs)
    known = {id(v) for v in opt.variables}
    for per_var, v in zip(slots, vs):
        for s in per_var:
            assert id(s) in known and tuple(s.shape) == tuple(v.shape)
    # the slot kind, without the variable's name: "momentum", "velocity", ...
    return [[s.name.rsplit("_", 1)[-1] if "average" not in s.name else "average_gradient"
             for s in per_var] for per_var in slots]


@pytest.mark.parametrize("make,want", [
    (lambda: keras.optimizers.SGD(0.1), []),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), ["momentum"]),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), ["momentum"]),
    (lambda: keras.optimizers.Adam(0.1), ["momentum", "velocity"]),
    (lambda: keras.optimizers.Adam(0.1, use_ema=True), ["momentum", "velocity"]),  # not EMA
    (lambda: keras.optimizers.RMSprop(0.1), ["velocity"]),
    (lambda: keras.optimizers.RMSprop(0.1, momentum=0.5, centered=True),
     ["average_gradient", "momentum", "velocity"]),
    (lambda: keras.optimizers.Adagrad(0.1), ["accumulator"]),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2),
     ["momentum"]),  # not the gradient accumulators
    (lambda: LocalAdaAlter(0.1), []),  # its A2 / B2 are not "inner state"
], ids=["sgd", "sgd_momentum", "nesterov", "adam", "adam_ema", "rmsprop", "rmsprop_centered",
        "adagrad", "grad_accumulation", "local_adaalter"])
def test_slot_discovery(make, want):
    vs = _vars((2,), (3, 2))
    opt = make()
    opt.build(vs)
    assert _slot_names(opt, vs) == [want, want]


def test_slot_discovery_finds_the_state_the_update_uses():
    vs = _vars((2,), (3,))
    opt = keras.optimizers.Adam(0.1, beta_1=0.5, beta_2=0.75)
    g = [tf.fill(v.shape, 2.0) for v in vs]
    opt.apply(g, vs)
    for m, v in _compat.slot_variables(opt, vs):  # sorted by attribute: _momentums, _velocities
        np.testing.assert_allclose(_np(m), 0.5 * 2.0)
        np.testing.assert_allclose(_np(v), 0.25 * 4.0)


def test_slot_discovery_skips_unshaped_non_float_and_none():
    vs = _vars((2,), (3,))
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(vs)
    opt.__dict__["_hl_test_ints"] = [keras.Variable(np.zeros(s, "int32")) for s in [(2,), (3,)]]
    opt.__dict__["_hl_test_shapes"] = [keras.Variable(np.zeros((5,), "float32"))] * 2
    opt.__dict__["_hl_test_none"] = [None, keras.Variable(np.zeros((3,), "float32"),
                                                          name="half")]
    got = [[s.name for s in per_var] for per_var in _compat.slot_variables(opt, vs)]
    assert got == [["w0_momentum"], ["half", "w1_momentum"]]
    assert _compat.slot_variables(opt, []) == []


def test_in_xla_context():
    assert _compat.in_xla_context() is False  # eager
    seen = {}

    def probe(key):
        def f(x):
            seen[key] = _compat.in_xla_context()
            return x + 1.0
        return f

    tf.function(probe("graph"), jit_compile=False).get_concrete_function(tf.constant(1.0))
    tf.function(probe("xla"), jit_compile=True).get_concrete_function(tf.constant(1.0))
    assert seen == {"graph": False, "xla": True}


def test_verify_inside_a_traced_function():
    # first use while a train step is traced: the probes run eagerly (tf.init_scope)
    out = {}

    @tf.function
    def step(x):
        _compat.verify()
        out["verified"] = _compat._state["verified"]
        return x * 2.0

    assert float(step(tf.constant(1.0))) == 2.0 and out["verified"]


# ---- LocalAdaAlter through _compat (its step hook is the public apply) ---------------------
def _adaalter_numpy(steps, grads, lr, eps, b0, warm, refresh=True):
    x, a2, b2, t_local = np.ones(3), np.full(3, b0), np.full(3, b0), 0
    for t in range(1, steps + 1):
        g = grads[t - 1]
        lr_t = lr * min(1.0, t / warm) if warm else lr
        x = x - lr_t * g / np.sqrt(b2 + (t_local + 1) * eps ** 2)
        a2 = a2 + g * g
        t_local += 1
        if refresh:
            b2, t_local = a2.copy(), 0
    return x, a2, b2, t_local


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("auto_refresh", [True, False], ids=["alone", "no_refresh"])
def test_local_adaalter_steps(graph, auto_refresh):
    w = keras.Variable(np.ones(3, "float64"))
    # float32-representable hyper-parameters: Keras casts them through float32
    opt = LocalAdaAlter(learning_rate=0.25, epsilon=0.5, initial_accumulator_value=2.0,
                        lr_warmup_steps=3)
    opt._auto_refresh = auto_refresh
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=3) for _ in range(5)]

    def step(g):
        opt.apply([g], [w])
    if graph:
        step = tf.function(step)
    for g in grads:
        step(tf.constant(g))
    x, a2, b2, t_local = _adaalter_numpy(5, grads, 0.25, 0.5, 2.0, 3, refresh=auto_refresh)
    np.testing.assert_allclose(_np(w), x, rtol=1e-12)
    ((got_a2, got_b2),) = opt.accumulator_pairs()
    np.testing.assert_allclose(_np(got_a2), a2, rtol=1e-12)
    np.testing.assert_allclose(_np(got_b2), b2, rtol=1e-12)
    assert int(_np(opt.local_steps)) == t_local
    assert int(_np(opt.iterations)) == 5


def test_local_adaalter_docstring_example():
    w = keras.Variable(np.ones(3, dtype="float32"))
    opt = LocalAdaAlter(learning_rate=0.5)
    opt.apply([2.0 * w.value], [w])
    np.testing.assert_allclose(_np(w), 1 - 0.5 * 2 / np.sqrt(2.0), rtol=1e-6)
    opt.apply([], [])  # Keras' no-op: not a step
    assert int(_np(opt.iterations)) == 1


# ---- a Keras without one of the private APIs -----------------------------------------------
def _remove_class_attr(monkeypatch, cls, name):
    owner = next(c for c in cls.__mro__ if name in vars(c))
    monkeypatch.delattr(owner, name)


def _expect_error(*needles):
    with pytest.raises(_compat.KerasCompatError) as info:
        _compat.verify()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in:\n{msg}"
    return msg


def test_missing_method_names_api_version_and_checked_versions(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    _remove_class_attr(monkeypatch, keras.optimizers.SGD, "_get_variable_index")
    msg = _expect_error("Optimizer._get_variable_index(variable)", "Keras 3.99.0",
                        "checked on Keras " + ", ".join(_compat.CHECKED_KERAS_VERSIONS),
                        "_compat.py")
    assert "_iterations" not in msg  # only what is missing
    # remembered: the next use fails the same way without probing again
    monkeypatch.undo()
    with pytest.raises(_compat.KerasCompatError, match=r"_get_variable_index"):
        _compat.variable_index(object(), None)


def test_missing_check_variables_are_known(monkeypatch):
    _remove_class_attr(monkeypatch, keras.optimizers.SGD, "_check_variables_are_known")
    _expect_error("Optimizer._check_variables_are_known(variables)",
                  f"Keras {keras.__version__}", _compat.CHECKED_KERAS_VERSIONS[0])


def test_renamed_instance_attributes(monkeypatch):
    build = BASE_OPTIMIZER.build

    def renamed(self, variables):
        build(self, variables)
        d = self.__dict__
        d["_iterations_v2"] = d.pop("_iterations")
        d["_trainable_vars"] = d.pop("_trainable_variables")

    monkeypatch.setattr(BASE_OPTIMIZER, "build", renamed)
    monkeypatch.setattr(keras, "__version__", "3.42.0")
    msg = _expect_error("Optimizer._iterations", "Optimizer._trainable_variables",
                        "Keras 3.42.0", _compat.CHECKED_KERAS_VERSIONS[0])
    assert "_get_variable_index" not in msg
    # the renamed list of the variables now looks like a slot list: the slot probe says so too
    assert "found slot shapes [[(2,), (2,)], [(3, 1), (3, 1)]]" in msg


def test_changed_slot_layout(monkeypatch):
    build = keras.optimizers.SGD.build

    def dict_slots(self, variables):
        build(self, variables)
        self.__dict__["momentums"] = {v.path: m for v, m in zip(variables, self.momentums)}

    monkeypatch.setattr(keras.optimizers.SGD, "build", dict_slots)
    _expect_error("optimizer slot variables", "found slot shapes [[], []]",
                  _compat.CHECKED_KERAS_VERSIONS[0])


def test_accessor_on_an_object_without_the_attribute():
    with pytest.raises(_compat.KerasCompatError, match=r"Optimizer\._iterations.*\n.*object has "
                                                       r"no attribute '_iterations'"):
        _compat.iterations(object())


def test_newer_keras_with_passing_probes_only_warns(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.warns(UserWarning, match=r"Keras 3\.99\.0 is not one of the versions.*"
                                         + re.escape(_compat.CHECKED_KERAS_VERSIONS[0])):
        _compat.verify()
    vs = _vars((2,))
    opt = keras.optimizers.SGD(0.1)
    opt.build(vs)
    assert _compat.variable_index(opt, vs[0]) == 0


@pytest.mark.parametrize("module", ["tensorflow.python.ops.no_such_module",
                                    "tensorflow.python.ops.array_ops"])  # no such function
def test_missing_private_tf_module_only_warns(monkeypatch, module):
    monkeypatch.setattr(_compat, "_TF_CONTROL_FLOW_UTIL", module)
    with pytest.warns(UserWarning, match="GraphOrParentsInXlaContext"):
        _compat.verify()
    seen = []
    tf.function(lambda x: seen.append(_compat.in_xla_context()) or x,
                jit_compile=True).get_concrete_function(tf.constant(1.0))
    assert seen == [False]


# ---- nothing else in the front end uses Keras' private APIs ---------------------------------
def _keras_private_names() -> set[str]:
    """Private attribute names of Keras optimizers and callbacks (classes and instances)."""
    def private(names):
        return {n for n in names if n.startswith("_") and not n.startswith("__")}

    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(_vars((2,)))
    cb = keras.callbacks.Callback()
    names = private(vars(opt)) | private(vars(cb))
    for cls in type(opt).__mro__ + type(cb).__mro__:
        if cls.__module__.startswith("keras"):
            names |= private(vars(cls))
    return names


FRONT_END = sorted(p.name for p in KERAS_DIR.glob("*.py") if p.name != "_compat.py")


@pytest.mark.parametrize("name", FRONT_END)
def test_only_compat_uses_private_apis(name):
    src = (KERAS_DIR / name).read_text()
    code = "\n".join(line.split("#", 1)[0] for line in src.splitlines())
    private = _keras_private_names()
    hits = sorted({m.group(1) for m in re.finditer(r"\.(_[A-Za-z]\w*)\b", code)
                   if m.group(1) in private})
    hits += re.findall(r"keras\.src|tensorflow\.python|\bvars\(", code)
    assert not hits, f"{name} uses private Keras/TF APIs {hits}: go through _compat"
