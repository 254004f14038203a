"""`genfast info`: versions, the extension's state, the GPU, and which backends serve each op."""

from __future__ import annotations

import platform

import torch

from genfast import _backend, _ext


def _versions() -> list[tuple[str, str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version + (" (interpreter: TRITON_INTERPRET=1)" if _backend.TRITON_INTERPRET else "")),
        ("CUDA (torch built with)", torch.version.cuda or "none"),
    ]


def _devices() -> list[tuple[str, str]]:
    rows = [("CPU threads", str(torch.get_num_threads()))]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append((f"GPU {index}", f"{props.name}, sm_{props.major}{props.minor}, "
                                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"))
    else:
        rows.append(("GPU", "none visible to torch"))
    return rows


def _extension() -> list[tuple[str, str]]:
    return [
        ("extension genfast._C", "loaded" if _ext.loaded else f"not loaded: {_ext.why_not}"),
        ("  its CUDA kernels", "loaded" if _ext.cuda_loaded else f"not loaded: {_ext.cuda_why_not}"),
        ("backend in force", _backend.get_backend()),
    ]


def _op_table() -> list[str]:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines = []
    for name in sorted(_backend.DISPATCHERS):
        dispatch = _backend.DISPATCHERS[name]
        for device in devices:
            serving = [b for b in _backend.BACKENDS if dispatch.why_not(b, device) is None]
            auto, _ = dispatch.select(device) if _backend.get_backend() == "auto" else (None, None)
            auto_note = f"   auto -> {auto}" if auto else ""
            lines.append(f"  {name:<22} {device.type:<5} {', '.join(serving)}{auto_note}")
    return lines


def info(file=None) -> str:
    """A report of this installation; printed to ``file`` if given, and returned."""
    sections = [("versions", _versions()), ("devices", _devices()), ("extension", _extension())]
    out = []
    for title, rows in sections:
        out.append(f"{title}:")
        out.extend(f"  {key:<24} {value}" for key, value in rows)
    out.append("ops (device: backends that can serve it):")
    out.extend(_op_table())
    text = "\n".join(out)
    if file is not None:
        print(text, file=file)
    return text
