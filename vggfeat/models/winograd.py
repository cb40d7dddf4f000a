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
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fileio import sha256_file

SOURCE = Path(__file__).with_name("csrc") / "winograd.c"
# Tiles per block: V and M of a block (36 · tiles · channels floats each) stay in the L2/L3
# caches while the matrix products read them; 256 was fastest from 64 to 512 channels.
BLOCK_TILES = 256
# Each block synchronises the threads three times (input transform, products, output
# transform), and on cores shared with other busy processes each synchronisation waits for the
# thread another process holds up: conv1_2 at Q = 512 (171 blocks of 256 tiles) then ran 3-6x
# slower than with 2048-tile blocks, which are as fast on an idle machine.  So blocks hold
# at least BLOCK_TILES tiles and as many more as fit in the V and M bytes of a 512→512 layer's
# 256-tile block (2048 tiles at 64 channels).
BLOCK_BYTES = 36 * BLOCK_TILES * (512 + 512) * 4


def block_tiles(c: int, k: int) -> int:
    """Tiles per block for C input and K output channels."""
    return max(BLOCK_TILES, BLOCK_BYTES // (36 * (c + k) * 4))
# A build folder older than this was left by a killed build (a build takes about a second).
STALE_BUILD_SECONDS = 3600

# F(4, 3) of Lavin & Gray: y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A.
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


class KernelBuildWarning(UserWarning):
    """The C transforms could not be built or loaded, or not kept in the cache."""


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


def _compiler() -> list[str]:
    """``$CC`` (default ``cc``), split as a shell would: ``CC="ccache gcc"`` works."""
    try:
        cc = shlex.split(os.environ.get("CC") or "cc")
    except ValueError as err:
        raise OSError(f"CC={os.environ['CC']!r} cannot be read as a command: {err}") from None
    if not cc or shutil.which(cc[0]) is None:
        raise OSError(f"no C compiler: {os.environ.get('CC') or 'cc'!r} is not on PATH (set CC "
                      "to one)")
    return cc


def _stamp(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _build(target: Path) -> None:
    """Compile SOURCE into the shared library ``target``, with the SHA-256 of what was built
    beside it (``_stamp``), so that a library damaged later is noticed before it is loaded:
    loading a truncated one crashes the process.  A killed build leaves no library behind."""
    cc = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("build-*"):  # left by killed builds
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(stale)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
        obj, lib = Path(tmp) / "winograd.o", Path(tmp) / target.name
        flags = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
        openmp = _loaded_openmp()
        steps = ([[*cc, *flags, "-c", str(SOURCE), "-o", str(obj)],
                  [*cc, "-shared", str(obj), openmp, "-o", str(lib)]] if openmp else
                 [[*cc, *flags, "-shared", str(SOURCE), "-o", str(lib)]])
        for step in steps:
            run = subprocess.run(step, capture_output=True, text=True)
            said = (run.stderr.strip() or run.stdout.strip())[-500:] or "nothing printed"
            if run.returncode:
                how = (f"was killed by signal {-run.returncode}" if run.returncode < 0 else
                       f"failed with exit status {run.returncode}")
                raise OSError(f"{shlex.join(step)} {how}: {said}")
        if not lib.is_file():
            raise OSError(f"{shlex.join(steps[-1])} wrote no library: {said}")
        Path(tmp, "stamp").write_text(sha256_file(lib).hex())
        os.replace(lib, target)
        os.replace(Path(tmp, "stamp"), _stamp(target))


def _load(library: Path) -> ctypes.CDLL:
    """The library at ``library``, built first if it is missing or differs from what was built."""
    try:
        intact = _stamp(library).read_text().strip() == sha256_file(library).hex()
    except OSError:
        intact = False
    if not intact:
        for path in (library, _stamp(library)):
            if path.is_dir():  # in the way of the library or its stamp
                shutil.rmtree(path, ignore_errors=True)
        _build(library)
    return ctypes.CDLL(str(library))


def _load_private(name: str) -> ctypes.CDLL:
    """Built in a new private temporary folder, loaded, and the folder removed (a loaded library
    stays mapped): for when the cache cannot be written."""
    folder = Path(tempfile.mkdtemp(prefix="vggfeat-kernels-"))
    try:
        _build(folder / name)
        return ctypes.CDLL(str(folder / name))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled transforms, built on first use (about a second) and kept in
    :func:`kernel_dir`; None, with a :class:`KernelBuildWarning`, where they cannot be built or
    loaded."""
    # -march=native: a library built for one CPU may not run on another sharing the cache.
    key = hashlib.sha256(SOURCE.read_bytes() + f"{platform.machine()} {cpu_name()} "
                         f"{_loaded_openmp()} {os.environ.get('CC') or 'cc'}".encode()).hexdigest()
    name, folder = f"winograd-{key[:16]}.so", kernel_dir() / "kernels"
    try:
        try:
            lib = _load(folder / name)
        except OSError as err:
            if err.errno is None:  # the compiler's or the loader's failure, not the cache's
                raise
            lib = _load_private(name)
            warnings.warn(f"the kernel cache {folder} cannot be written ({err}); the Winograd "
                          "kernels were built for this run only: set VGGFEAT_CACHE to a writable "
                          "folder to keep them", KernelBuildWarning, stacklevel=2)
    except OSError as err:
        warnings.warn(f"the Winograd CPU kernels could not be built or loaded ({err}); Winograd "
                      "layers run on torch ops, and --backend auto runs torch's convolution",
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
    block = min(block_tiles(c, k), tiles)
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


def fast_path_applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether a CPU backend layer (``fast``, ``eager``, ``weight``) may run ``fast`` on ``x``:
    float32 on the CPU, no autocast and no autograd (the fast paths compute values only)."""
    weight = layer.weight
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def run_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """A CPU backend layer's output: ``fast`` where it applies, unless the layer has an
    ``auto`` (the ``auto`` backend's ``auto(layer, x)``, which runs the path measured faster
    for this case, measuring it first if the case is new); ``eager`` elsewhere."""
    if not fast_path_applies(layer, x):
        return layer.eager(x)
    return layer.fast(x) if layer.auto is None else layer.auto(layer, x)


class WinogradConv2d(nn.Conv2d):
    """A 3×3 convolution run by :func:`winograd_conv3x3` on float32 CPU inputs without autograd,
    and as ``nn.Conv2d`` otherwise (GPU, autocast, gradients).

    Built by :meth:`from_conv`, it shares the original layer's weight and bias (the original is
    not changed) and holds their Winograd transform, ``u`` (made again if the weights change in
    place through the parameter, e.g. by an optimiser step; not after changes through
    ``.data``).  With ``relu``, the layer also applies the ReLU that follows it (the backend
    then drops that ReLU).  ``auto(layer, x)``, if given, runs whichever of :meth:`fast` and
    :meth:`eager` was measured faster (the ``auto`` backend's choice; see :func:`run_layer`).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, relu: bool = False, auto=None) -> WinogradConv2d:
        if not winograd_eligible(conv):
            raise ValueError(f"not a 3×3 stride-1 padding-1 convolution: {conv}")
        layer = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                    device="meta")
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.register_buffer("u", filter_transform(conv.weight), persistent=False)
        layer.u_version = conv.weight._version
        layer.relu, layer.auto = relu, auto
        return layer

    def fast(self, x: Tensor) -> Tensor:
        if self.u_version != self.weight._version:  # the weights were changed in place since
            self.u, self.u_version = filter_transform(self.weight), self.weight._version
        return winograd_conv3x3(x, self.u, self.bias, relu=self.relu)

    def eager(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y.relu_() if self.relu else y

    def forward(self, x: Tensor) -> Tensor:
        return run_layer(self, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")
