"""Winograd F(4×4, 3×3) convolution for float32 on CPUs: the ``winograd`` backend's layer.

A 3×3 convolution of stride 1 and padding 1 computes each 4×4 output tile from a 6×6 input
window.  In the Winograd domain (Lavin & Gray 2016) that takes 36 multiplications per tile and
channel pair instead of 144, as 36 matrix products ``M[ξ] = V[ξ] · U[ξ]`` over the input
channels, which torch's BLAS runs at nearly the CPU's peak.  The transforms around them
(``V = Bᵀ d B`` of each window, ``y = Aᵀ m A`` of each tile) are memory-bound; a small C kernel
(``csrc/winograd.c``, compiled on first use with the machine's C compiler) does them in one pass
over channels-last data, a block of tiles at a time so that V and M stay in cache.  Without a C
compiler, the same arithmetic runs on torch ops (slower; the ``auto`` backend then keeps torch's
own convolution).

Results match ``F.conv2d`` to about 1e-5 relative: the transforms add a few float32 roundings.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("csrc") / "winograd.c"
# Tiles per block: V and M of a block (36 · tiles · channels floats each) stay in the L2/L3
# caches while the matrix products read them; 256 was fastest from 64 to 512 channels.
BLOCK_TILES = 256

# F(4, 3) of Lavin & Gray: y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A.
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


class KernelBuildWarning(UserWarning):
    """The C transforms could not be built: Winograd layers run on torch ops instead."""


def kernel_dir() -> Path:
    """Where compiled kernels are kept: ``$VGGFEAT_CACHE`` or ``$XDG_CACHE_HOME/vggfeat``
    (``~/.cache/vggfeat``)."""
    if os.environ.get("VGGFEAT_CACHE"):
        return Path(os.environ["VGGFEAT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vggfeat"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for keys of what is built or measured per CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def filter_transform(weight: Tensor) -> Tensor:
    """K×C×3×3 weights → the 36 matrices U (36×C×K float32): ``U[6a+b] = (G w Gᵀ)[a, b]``."""
    g = torch.tensor(_G, device=weight.device)
    gg = torch.einsum("ai,bj->abij", g, g).reshape(36, 9)
    k, c = weight.shape[:2]
    # One matrix product whose output is already laid out as 36×C×K.
    w = weight.detach().float().permute(1, 0, 2, 3).reshape(c * k, 9)
    return (gg @ w.T).view(36, c, k)


def _loaded_openmp() -> str | None:
    """Path of torch's OpenMP runtime in this process, so the kernels link to the same one and
    share its threads instead of starting a second pool that competes for the cores.  Other
    packages (scikit-learn's wheels) may load their own copy: torch's folders come first."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    runtimes = {line.split(maxsplit=5)[-1] for line in maps.splitlines()
                if os.path.basename(line.split(maxsplit=5)[-1]).startswith(
                    ("libgomp", "libiomp5", "libomp")) and ".so" in line}
    torch_dir = os.path.dirname(torch.__file__)  # torch/lib/, or torch.libs/ beside it
    return min(runtimes, key=lambda path: (not path.startswith(torch_dir), path), default=None)


def _build(target: Path) -> None:
    """Compile SOURCE into the shared library ``target`` (atomically: a killed build leaves no
    half-written library)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler: {cc!r} is not on PATH (set CC to one)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "winograd.o", Path(tmp) / target.name
        flags = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
        openmp = _loaded_openmp()
        steps = ([[cc, *flags, "-c", str(SOURCE), "-o", str(obj)],
                  [cc, "-shared", str(obj), openmp, "-o", str(lib)]] if openmp else
                 [[cc, *flags, "-shared", str(SOURCE), "-o", str(lib)]])
        for step in steps:
            run = subprocess.run(step, capture_output=True, text=True)
            if run.returncode:
                raise OSError(f"{' '.join(step)} failed: {run.stderr.strip()[-500:]}")
        os.replace(lib, target)


@functools.cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled transforms, built on first use (about a second) and kept in
    :func:`kernel_dir`; None, with a :class:`KernelBuildWarning`, where they cannot be built."""
    # -march=native: a library built for one CPU may not run on another sharing the cache.
    key = hashlib.sha256(SOURCE.read_bytes() + f"{platform.machine()} {cpu_name()} "
                         f"{_loaded_openmp()} {os.environ.get('CC', 'cc')}".encode()).hexdigest()
    name = f"winograd-{key[:16]}.so"
    # The cache, or a private temporary folder where the cache is read-only.
    private = Path(tempfile.gettempdir()) / f"vggfeat-{getattr(os, 'getuid', lambda: 0)()}"
    for folder in (kernel_dir() / "kernels", private):
        path = folder / name
        try:
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            break
        except OSError as err:
            if err.errno is not None and folder != private:  # the file system's, not the build's
                continue
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)  # one that does not load is built again next time
            warnings.warn(f"the Winograd CPU kernels could not be built ({err}); Winograd layers "
                          "run on torch ops, and --backend auto keeps torch's convolution",
                          KernelBuildWarning, stacklevel=2)
            return None
    size, ptr = ctypes.c_long, ctypes.c_void_p
    lib.wino_input.argtypes = [ptr, ptr] + [size] * 6
    lib.wino_output.argtypes = [ptr, ptr, ptr] + [size] * 6 + [ctypes.c_int]
    return lib


def winograd_conv3x3(x: Tensor, u: Tensor, bias: Tensor | None, *, relu: bool = False) -> Tensor:
    """``F.conv2d(x, w, bias, padding=1)`` for 3×3 weights w with ``u = filter_transform(w)``,
    followed by a ReLU if ``relu``.

    x: N×C×H×W float32 on the CPU (any layout; channels_last avoids a copy) → N×K×H×W, in
    channels_last memory format.
    """
    lib = load_kernels()
    if lib is None:
        y = _winograd_torch(x, u, bias)
        return y.relu_() if relu else y
    n, c, h, w = x.shape
    k = u.shape[2]
    x = x.contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.detach().float().contiguous()
    y = torch.empty(n, k, h, w, memory_format=torch.channels_last)
    tiles = n * -(-h // 4) * -(-w // 4)
    block = min(BLOCK_TILES, tiles)
    v_buf, m_buf = torch.empty(36 * block * c), torch.empty(36 * block * k)
    for t0 in range(0, tiles, block):
        count = min(block, tiles - t0)
        v, m = v_buf[:36 * count * c].view(36, count, c), m_buf[:36 * count * k].view(36, count, k)
        lib.wino_input(x.data_ptr(), v.data_ptr(), n, h, w, c, t0, count)
        torch.bmm(v, u, out=m)
        lib.wino_output(m.data_ptr(), y.data_ptr(), None if bias is None else bias.data_ptr(),
                        n, h, w, k, t0, count, int(relu))
    return y


def _winograd_torch(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """The same arithmetic as the C kernels, on torch ops: the fallback without a compiler."""
    n, c, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    bt = torch.tensor(_BT, dtype=x.dtype, device=x.device)
    at = torch.tensor(_AT, dtype=x.dtype, device=x.device)
    padded = F.pad(x, (1, 4 * tw + 1 - w, 1, 4 * th + 1 - h)).permute(0, 2, 3, 1)
    windows = padded.unfold(1, 6, 4).unfold(2, 6, 4)  # N×th×tw×C×6×6
    v = torch.einsum("ai,ntwcij,bj->abntwc", bt, windows, bt).reshape(36, -1, c)
    m = torch.bmm(v, u).view(6, 6, n, th, tw, -1)
    y = torch.einsum("pa,abntwk,qb->ntpwqk", at, m, at).reshape(n, 4 * th, 4 * tw, -1)
    y = y[:, :h, :w].permute(0, 3, 1, 2)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def winograd_eligible(conv: nn.Module) -> bool:
    """A plain 3×3 convolution of stride 1 and padding 1 (every 3×3 layer of Table 1)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def fast_path_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether a CPU backend layer may take its fast path: float32 on the CPU, no autocast and
    no autograd (the fast paths compute values only)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class WinogradConv2d(nn.Conv2d):
    """A 3×3 convolution run by :func:`winograd_conv3x3` on float32 CPU inputs without autograd,
    and as ``nn.Conv2d`` otherwise (GPU, autocast, gradients).

    Built by :meth:`from_conv`, it shares the original layer's weight and bias (the original is
    not changed) and holds their Winograd transform, ``u``.  With ``relu``, the layer also
    applies the ReLU that follows it (the backend then drops that ReLU).  ``choose(layer, x)``,
    if given, decides per call between :meth:`fast` and :meth:`eager` (the ``auto`` backend's
    measured choice).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, relu: bool = False, choose=None) -> WinogradConv2d:
        if not winograd_eligible(conv):
            raise ValueError(f"not a 3×3 stride-1 padding-1 convolution: {conv}")
        layer = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                    device="meta")
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.register_buffer("u", filter_transform(conv.weight), persistent=False)
        layer.relu, layer.choose = relu, choose
        return layer

    def fast(self, x: Tensor) -> Tensor:
        return winograd_conv3x3(x, self.u, self.bias, relu=self.relu)

    def eager(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y.relu_() if self.relu else y

    def forward(self, x: Tensor) -> Tensor:
        if fast_path_applies(x, self.u) and (self.choose is None or self.choose(self, x)):
            return self.fast(x)
        return self.eager(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")
