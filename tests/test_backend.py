"""The backend registry: choosing, refusing clearly, and auto never failing where the reference works."""

import importlib.util
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import _backend, _ext


def test_set_backend_and_context_nest():
    genfast.set_backend("reference")
    assert genfast.get_backend() == "reference"
    with genfast.backend("cpu"):
        assert genfast.get_backend() == "cpu"
        with genfast.backend("auto"):
            assert genfast.get_backend() == "auto"
        assert genfast.get_backend() == "cpu"
    assert genfast.get_backend() == "reference"


def test_context_restores_on_error():
    genfast.set_backend("auto")
    with pytest.raises(KeyError):
        with genfast.backend("reference"):
            raise KeyError("boom")
    assert genfast.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["gpu", "", "Triton"])
def test_unknown_backend_names_the_argument(bad):
    with pytest.raises(ValueError, match="set_backend\\(name\\): unknown backend"):
        genfast.set_backend(bad)
    with pytest.raises(ValueError, match="backend\\(name\\): unknown backend"):
        with genfast.backend(bad):
            pass


def test_named_backend_that_cannot_serve_raises():
    # The cuda backend never serves CPU tensors; asking for it by name must not fall back silently.
    with genfast.backend("cuda"), pytest.raises(genfast.BackendError, match="philox_noise: backend 'cuda'"):
        genfast.ops.philox_noise(1, 4)


def test_auto_falls_back_to_reference_when_nothing_else_serves():
    dispatch = _backend.Dispatcher("toy", reference=lambda: "ref")
    dispatch.register("cpu", supports=lambda **_: "never")(lambda: "cpu")
    with genfast.backend("auto"):
        assert dispatch.select(torch.device("cpu"))[0] == "reference"
    with genfast.backend("cpu"), pytest.raises(genfast.BackendError, match="never"):
        dispatch.select(torch.device("cpu"))


def test_environment_variable_chooses_and_is_validated():
    code = "import genfast; print(genfast.get_backend())"
    env = {"GENFAST_BACKEND": "reference", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["GENFAST_BACKEND"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "GENFAST_BACKEND: unknown backend 'fastest'" in bad.stderr


def test_package_imports_and_works_without_the_extension():
    code = (
        "import torch, genfast\n"
        "from genfast import _ext\n"
        "assert not _ext.loaded and 'GENFAST_SKIP_EXT' in _ext.why_not\n"
        "print(genfast.ops.philox_noise(3, 4).tolist())\n"
    )
    env = {"GENFAST_SKIP_EXT": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(genfast.ops.philox_noise_ref(torch.tensor([3]), 4).tolist())


def test_extension_is_built_here():
    # `make test` builds the extension; if it did not load, the cpu backend would go untested.
    assert _ext.loaded, _ext.why_not


def test_info_lists_every_op_and_the_extension():
    text = genfast.info()
    assert "torch" in text and "extension genfast._C" in text
    for op in _backend.DISPATCHERS:
        assert op in text
    out = subprocess.run([sys.executable, "-m", "genfast", "info"], capture_output=True, text=True, check=True)
    assert "backends that can serve it" in out.stdout


def test_backend_block_is_per_thread():
    # A block in one thread must not change what another thread sees, on entry or on exit (issue: a shared stack
    # let thread A's `with backend("reference")` leak into thread B, and A's exit popped B's choice).
    import threading

    genfast.set_backend("auto")
    entered, checked, left = threading.Event(), threading.Event(), threading.Event()
    seen_in_thread = []

    def other():
        with genfast.backend("reference"):
            seen_in_thread.append(genfast.get_backend())
            entered.set()
            checked.wait(10)
        left.set()

    worker = threading.Thread(target=other)
    worker.start()
    try:
        assert entered.wait(10)
        assert genfast.get_backend() == "auto"
        with genfast.backend("cpu"):
            checked.set()
            assert left.wait(10)
            assert genfast.get_backend() == "cpu"
            assert genfast.ops.philox_noise(1, 4).equal(genfast.ops.philox_noise_ref(torch.tensor([1]), 4))
        assert genfast.get_backend() == "auto"
    finally:
        checked.set()
        worker.join(10)
    assert seen_in_thread == ["reference"]


def test_set_backend_is_process_wide_and_threads_inherit_it():
    import threading

    seen = []
    genfast.set_backend("reference")
    try:
        worker = threading.Thread(target=lambda: seen.append(genfast.get_backend()))
        worker.start()
        worker.join(10)
    finally:
        genfast.set_backend("auto")
    assert seen == ["reference"]


def test_compiled_function_follows_the_calling_threads_choice():
    # Dynamo guards on the per-thread choice: the same compiled function retraces for another thread's backend
    # instead of reusing a graph traced under a different one.
    import threading

    calls = []
    dispatch = _backend.Dispatcher("toy_thread", reference=lambda x: x + 1)
    dispatch.register("cpu")(lambda x: x + 2)

    def fn(x):
        return dispatch(x, device=x.device)

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.zeros(1)
    with genfast.backend("reference"):
        calls.append(compiled(x).item())

    def other():
        with genfast.backend("cpu" if _ext.loaded else "reference"):
            calls.append(compiled(x).item())

    worker = threading.Thread(target=other)
    worker.start()
    worker.join(60)
    calls.append(compiled(x).item())  # auto here: cpu when the extension is loaded
    expected_cpu = 2.0 if _ext.loaded else 1.0
    assert calls == [1.0, expected_cpu, expected_cpu]


# ------------------------------------------------------------------------------------------- Triton on first use
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "GENFAST_BACKEND": "auto", **env})


def test_import_genfast_does_not_import_triton():
    """`import genfast` only finds the triton package; CPU work with the C++ kernels or the reference never imports
    it; the first question about the triton backend does."""
    code = ("import sys, torch, genfast\n"
            "from genfast import _backend\n"
            "assert 'triton' not in sys.modules\n"
            "genfast.ops.philox_noise(torch.tensor([3]), 4)\n"
            "with genfast.backend('reference'):\n"
            "    genfast.ops.philox_noise(torch.tensor([3]), 4)\n"
            "assert 'triton' not in sys.modules\n")
    code += ("assert _backend.triton_why_not() is None and 'triton' in sys.modules\n" if _HAS_TRITON
             else "assert _backend.triton_why_not() is not None\n")
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_missing_triton_is_a_reason_not_a_crash():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, genfast\n"
            "from genfast import _backend\n"
            "assert _backend.triton_why_not().startswith('triton is not installed')\n"
            "with genfast.backend('triton'):\n"
            "    try:\n"
            "        genfast.ops.philox_noise(torch.tensor([3]), 4)\n"
            "    except genfast.BackendError as error:\n"
            "        print(error)\n")
    done = _python(code, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "philox_noise: backend 'triton' cannot serve this call: triton is not installed" in done.stdout


@pytest.mark.skipif(not _HAS_TRITON, reason="needs triton")
def test_first_triton_choice_inside_a_compiled_function():
    """TorchDynamo traces the dispatcher, so the first-use import of triton may happen inside a trace: fullgraph
    holds and the kernel's result is the reference's."""
    code = ("import sys, torch, genfast\n"
            "def f(x):\n"
            "    return genfast.ops.philox_noise(x, 8)\n"
            "with genfast.backend('triton'):\n"
            "    out = torch.compile(f, fullgraph=True, backend='eager')(torch.tensor([3]))\n"
            "assert 'triton' in sys.modules\n"
            "assert torch.equal(out, genfast.ops.philox_noise_ref(torch.tensor([3]), 8)), out\n")
    done = _python(code, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-2000:]
