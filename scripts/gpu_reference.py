#!/usr/bin/env python3
"""Time the PyTorch reference (IceClear/StableSR at 398ee93) next to pfstorer, on the same weights.

The reference sources are not part of this project: point STABLESR_ROOT at an extracted copy of
the StableSR repository (see /work/shared/reference/setup.sh). Packages the reference imports but
does not need here (pytorch_lightning, taming, clip, basicsr; matplotlib, sklearn, cv2, kornia,
transformers when absent) are replaced by small stand-ins written to a temporary folder at start.

Measurements (one JSON line each on stdout; all other output goes to stderr):
  unet     one time-aware encoder pass on a batch-1 LQ latent plus one UNet forward on the
           classifier-free-guidance batch of 2 (t = 500, random [2, 77, 1024] context), at a
           square latent of --latent; median of --runs after one warm-up run.
  restore  StableSR's restore path for one --size image, as its tile script does it at 512 px:
           VAE encode of a random LQ image (diffusion VAE for the latent, CFW encoder for the
           fusion features), x_T = q_sample(LQ latent, t = 999) on the original 1000-step
           schedule, the --steps respaced DDPM loop with classifier-free guidance (positive
           prompt, negative prompt as the unconditional branch), CFW decode with dec_w 0.5.
           Also times its parts: vae_encode_s (diffusion VAE encode), sample_s (the loop),
           cfw_encode_s (CFW encoder features) and cfw_decode_s (fused decode).
  Runs on the CPU as well (--device cpu --dtype f32 --threads N) for the CPU ratios.

  STABLESR_ROOT=$REF/StableSR python scripts/gpu_reference.py --device cuda --dtype f16
      --weights stablesr_face_random.safetensors --cfw cfw_random.safetensors  (one command)

Reduced precision follows the reference scripts (`--precision autocast`, their default):
fp32 weights, torch.autocast with float16/bfloat16. Without --weights/--cfw the models keep
their seeded random initialisation (torch.manual_seed(0)); with them, every model parameter
must be present in the file (exit status 3 otherwise), so both sides time identical numbers.
"""
import argparse
import atexit
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

FACE_CONFIG = "configs/stableSRNew/v2-finetune_face_T_512.yaml"
CFW_CONFIG = "configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml"
# pfstorer's prompts (src/prompts.rs), with its identity placeholder replaced as for the base model.
POSITIVE = "a Photo of person, masterpiece, best quality, realistic, very clear, professional"
NEGATIVE = "3d, cartoon, anime, sketches, worst quality, low quality"

# --------------------------------------------------------------------------------------------
# Stand-ins for packages the reference imports at module level but never uses on this path.
# They are written by this script; none of them contains reference code.
# --------------------------------------------------------------------------------------------
_STANDINS = {
    "pytorch_lightning/__init__.py": '''
import random
import numpy
import torch


class LightningModule(torch.nn.Module):
    """nn.Module plus the two members the reference's inference code touches."""

    @property
    def device(self):
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def log(self, *args, **kwargs):
        return None

    def log_dict(self, *args, **kwargs):
        return None


class Callback:
    pass


def seed_everything(seed=0):
    seed = int(seed or 0)
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    return seed
''',
    "pytorch_lightning/utilities/__init__.py": "from .distributed import rank_zero_only\n",
    "pytorch_lightning/utilities/distributed.py": "def rank_zero_only(fn):\n    return fn\n",
    "taming/__init__.py": "",
    "taming/modules/__init__.py": "",
    "taming/modules/vqvae/__init__.py": "",
    "taming/modules/vqvae/quantize.py": '''
class VectorQuantizer2:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("stand-in: vector-quantised models are not available here")
''',
    "clip/__init__.py": "",
    # basicsr: the reference's CFW decoder builds on basicsr's RRDB blocks, so the real files
    # basicsr/archs/{arch_util,rrdbnet_arch,stylegan2_arch}.py and basicsr/utils/registry.py
    # of STABLESR_ROOT are used, reached through these packages without running basicsr's own
    # __init__ files (which import every architecture, dataset and compiled op). The names below
    # are imported by ldm but used by training code or by unused layers only.
    "basicsr/__init__.py": "__path__.append({real!r})\n",
    "basicsr/archs/__init__.py": "__path__.append({real_archs!r})\n",
    "basicsr/utils/__init__.py": '''
import logging

__path__.append({real_utils!r})


def get_root_logger(*args, **kwargs):
    return logging.getLogger("basicsr")


def _training_only(*args, **kwargs):
    raise RuntimeError("stand-in: basicsr training utilities are not available here")


class DiffJPEG:
    def __init__(self, *args, **kwargs):
        _training_only()


class USMSharp(DiffJPEG):
    pass
''',
    "basicsr/utils/img_process_util.py": "from . import _training_only as filter2D\n",
    "basicsr/data/__init__.py": "",
    "basicsr/data/transforms.py": '''
from basicsr.utils import _training_only as paired_random_crop
from basicsr.utils import _training_only as triplet_random_crop
''',
    "basicsr/data/degradations.py": '''
from basicsr.utils import _training_only as random_add_gaussian_noise_pt
from basicsr.utils import _training_only as random_add_poisson_noise_pt
from basicsr.utils import _training_only as random_add_speckle_noise_pt
from basicsr.utils import _training_only as random_add_saltpepper_noise_pt
from basicsr.utils import _training_only as bivariate_Gaussian
''',
    # Compiled CUDA ops of layers StableSR-face never builds (deformable conv, StyleGAN2).
    "basicsr/ops/__init__.py": '''
def _unavailable(*args, **kwargs):
    raise RuntimeError("stand-in: basicsr compiled ops are not available here")
''',
    "basicsr/ops/dcn/__init__.py": '''
from basicsr.ops import _unavailable as modulated_deform_conv


class ModulatedDeformConvPack:
    def __init__(self, *args, **kwargs):
        modulated_deform_conv()
''',
    "basicsr/ops/fused_act/__init__.py": '''
from basicsr.ops import _unavailable as fused_leaky_relu
from basicsr.ops.dcn import ModulatedDeformConvPack as FusedLeakyReLU
''',
    "basicsr/ops/upfirdn2d/__init__.py": "from basicsr.ops import _unavailable as upfirdn2d\n",
}

_LOOSE_VERSION = '''
import re


class LooseVersion:
    """Numeric-parts comparison; enough for the version checks basicsr makes."""

    def __init__(self, text):
        self.parts = [int(p) for p in re.findall(r"\\d+", str(text))]

    def __ge__(self, other):
        return self.parts >= other.parts

    def __lt__(self, other):
        return self.parts < other.parts
'''

# Imported at module level by the reference, used only by code paths not taken here; replaced
# by a generic placeholder package when they cannot be imported.
_OPTIONAL = ["matplotlib", "sklearn", "cv2", "kornia", "transformers"]


class _Placeholder:
    """Any name of an absent package: constructible, subclassable, usable as a decorator."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return self


class _AbsentPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)
        self.names = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        finder = self

        def attr(name):
            if name.startswith("__"):
                raise AttributeError(name)
            key = (module.__name__, name)
            if key not in finder.names:
                finder.names[key] = type(name, (_Placeholder,), {"__module__": module.__name__})
            return finder.names[key]

        module.__getattr__ = attr


def install_standins(root):
    folder = tempfile.mkdtemp(prefix="stablesr-standins-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    real = os.path.join(os.path.abspath(root), "basicsr")
    names = {"real": real, "real_archs": os.path.join(real, "archs"), "real_utils": os.path.join(real, "utils")}
    files = dict(_STANDINS)
    try:
        import distutils.version  # noqa: F401  (gone from Python 3.12 unless setuptools provides it)
    except ImportError:
        files["distutils/__init__.py"] = ""
        files["distutils/version.py"] = _LOOSE_VERSION
    for rel, text in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel.startswith("basicsr/") and "{real" in text:
            text = text.format(**names)
        with open(path, "w") as f:
            f.write(text.lstrip("\n"))
    # The stand-ins shadow real installs (pytorch_lightning >= 1.x and StableSR's own basicsr
    # import far more than this path needs); the reference sources come right after them.
    sys.path[:0] = [folder, root]
    absent = []
    for name in _OPTIONAL:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any failure means: not usable here
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            absent.append(name)
    if absent:
        sys.meta_path.insert(0, _AbsentPackages(absent))
    # Some torchvision versions renamed a module older code imports.
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
    except ImportError:
        try:
            import torchvision.transforms._functional_tensor as ft
            sys.modules["torchvision.transforms.functional_tensor"] = ft
        except ImportError:
            pass
    return folder, absent


# --------------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="diffusion checkpoint (safetensors, original key names)")
    ap.add_argument("--cfw", help="CFW autoencoder (safetensors, original key names)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"],
                    help="f16/bf16: torch.autocast over fp32 weights, as the reference scripts do")
    ap.add_argument("--latent", type=int, default=64, help="square latent of the unet measurement")
    ap.add_argument("--size", type=int, default=512, help="image side of the restore measurement")
    ap.add_argument("--steps", type=int, default=200, help="respaced DDPM steps of the restore")
    ap.add_argument("--guidance", type=float, default=4.0,
                    help="classifier-free guidance scale (pfstorer restore's default); 1 disables the "
                         "negative branch")
    ap.add_argument("--dec-w", type=float, default=0.5, help="CFW fusion weight")
    ap.add_argument("--sampler", default="plain", choices=["plain", "canvas"],
                    help="plain: model.sample (encoder on the batch-1 LQ latent, UNet on the CFG batch "
                         "of 2); canvas: model.sample_canvas as the tile script (encoder on the CFG batch)")
    ap.add_argument("--runs", type=int, default=3, help="timed unet runs after one warm-up")
    ap.add_argument("--what", default="unet,restore",
                    help="comma list of: unet, restore, codec (VAE encode, CFW encoder features and "
                         "CFW decode of a --size image, --runs times each after a warm-up)")
    ap.add_argument("--seed", type=int, default=42, help="seed of inputs and sampling noise")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--save-weights", help="write the diffusion model's weights (after loading) here")
    ap.add_argument("--save-cfw", help="write the CFW autoencoder's weights (after loading) here; "
                                       "the CFW model is only built with --what restore")
    a = ap.parse_args()
    a.what = [w.strip() for w in a.what.split(",") if w.strip()]
    bad = [w for w in a.what if w not in ("unet", "restore", "codec")]
    if bad:
        ap.error(f"--what: unknown measurement(s) {bad}")
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the reference schedule code needs two)")
    if a.size % 32:
        ap.error("--size must be a multiple of 32")
    return a


class Run:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_reference: --device cuda but torch.cuda.is_available() is false")
        self.amp_dtype = {"f32": None, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self):
        out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        if self.device.type == "cuda":
            out["peak_alloc_gb"] = self.torch.cuda.max_memory_allocated() / 1e9
            out["peak_reserved_gb"] = self.torch.cuda.max_memory_reserved() / 1e9
        return out


@contextlib.contextmanager
def skipped_init(enabled):
    """Skip random initialisation while building models whose every parameter is then loaded
    from a file (checked), which saves tens of seconds for the 1.3 B parameters."""
    import torch

    if not enabled:
        yield
        return
    names = ["uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_"]
    saved = {n: getattr(torch.nn.init, n) for n in names if hasattr(torch.nn.init, n)}
    try:
        for n in saved:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def load_checked(module, path, label, strip_prefix=None):
    """strict=False load that refuses to go on when a parameter of `module` is not in the file or
    has another shape. Top-level buffers (the noise schedule) are recomputed, never loaded."""
    from safetensors.torch import load_file

    sd = load_file(path)
    if strip_prefix:
        sd = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in sd.items()}
    own = module.state_dict()
    params = dict(module.named_parameters())
    schedule = {k for k in own if "." not in k and k not in params}
    missing = sorted(k for k in params if k not in sd)
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and k not in schedule and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or mismatched:
        print(f"gpu_reference: {label} weights {path} do not cover the model:", file=sys.stderr)
        for k in missing[:50]:
            print(f"  missing parameter {k}", file=sys.stderr)
        if len(missing) > 50:
            print(f"  ... {len(missing) - 50} more missing", file=sys.stderr)
        for m in mismatched[:50]:
            print(f"  shape mismatch {m}", file=sys.stderr)
        print(f"gpu_reference: FAIL: {len(missing)} missing, {len(mismatched)} mismatched in {label}; "
              "refusing to time different weights", file=sys.stderr)
        raise SystemExit(3)
    use = {k: v for k, v in sd.items() if k in own and k not in schedule}
    unexpected = sorted(k for k in sd if k not in own)
    result = module.load_state_dict(use, strict=False)
    missing_buffers = [k for k in result.missing_keys if k not in params and k not in schedule]
    print(f"gpu_reference: {label}: loaded {len(use)} tensors from {path} "
          f"({len(unexpected)} unused keys, {len([k for k in sd if k in schedule])} schedule buffers "
          f"recomputed, {len(missing_buffers)} buffers not in file)", file=sys.stderr)
    if unexpected:
        print(f"  unused keys (first 10): {unexpected[:10]}", file=sys.stderr)
    if missing_buffers:
        print(f"  buffers kept from construction: {missing_buffers[:10]}", file=sys.stderr)
    return {"file": os.path.abspath(path), "tensors": len(use), "unused_keys": len(unexpected)}


def save_weights(module, path):
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()
          if "." in k}  # no schedule buffers
    save_file(sd, path)
    print(f"gpu_reference: wrote {len(sd)} tensors to {path}", file=sys.stderr)


def text_encoder_usable():
    """(ok, description): the reference's FrozenOpenCLIPEmbedder needs open_clip_torch 2.0.2
    (3.x is batch-first and would silently change the encoder)."""
    try:
        version = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        return False, "random contexts: open_clip_torch not installed"
    if version != "2.0.2":
        return False, f"random contexts: open_clip_torch {version} installed, 2.0.2 needed"
    try:
        import open_clip  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"random contexts: open_clip import failed ({type(e).__name__}: {e})"
    return True, "open_clip 2.0.2 ViT-H-14, penultimate layer"


def build(args, run, root):
    """The diffusion model (and the CFW autoencoder when restoring), weights loaded and checked."""
    import torch
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(os.path.join(root, FACE_CONFIG))
    params = cfg.model.params
    restoring = "restore" in args.what
    needs_cfw = restoring or "codec" in args.what
    text_ok, text_desc = text_encoder_usable() if restoring else (False, "not needed: random contexts")
    if text_ok:
        # Random (or file) weights instead of downloading LAION's; tokens go to our device.
        params.cond_stage_config.params.version = ""  # open_clip: no pretrained download
        params.cond_stage_config.params.device = args.device
    else:
        params.cond_stage_config = {"target": "torch.nn.Identity"}

    torch.manual_seed(0)
    with skipped_init(args.weights is not None):
        model = instantiate_from_config(cfg.model)
    model.eval()
    model.configs = cfg  # as the tile script sets it (read by the canvas sampler)
    info = {"weights": "random init (torch.manual_seed(0))"}
    if args.weights:
        info["weights"] = load_checked(model, args.weights, "diffusion")

    vq = None
    if needs_cfw:
        vcfg = OmegaConf.load(os.path.join(root, CFW_CONFIG))
        # The training loss (LPIPS + discriminator) is not part of inference.
        vcfg.model.params.lossconfig = {"target": "torch.nn.Identity"}
        torch.manual_seed(0)
        with skipped_init(args.cfw is not None):
            vq = instantiate_from_config(vcfg.model)
        vq.eval()
        info["cfw"] = "random init (torch.manual_seed(0))"
        if args.cfw:
            info["cfw"] = load_checked(vq, args.cfw, "cfw", strip_prefix="first_stage_model.")
        vq.decoder.fusion_w = args.dec_w
    if args.save_weights:
        save_weights(model, args.save_weights)
    if args.save_cfw and vq is not None:
        save_weights(vq, args.save_cfw)

    # The noise schedule exactly as the reference scripts set it up: the 1000-step linear
    # schedule (kept for q_sample at t = 999), then respaced to --steps.
    from ldm.models.diffusion.ddpm import space_timesteps
    import numpy as np

    model.register_schedule(given_betas=None, beta_schedule="linear", timesteps=1000,
                            linear_start=0.00085, linear_end=0.0120, cosine_s=8e-3)
    model.num_timesteps = 1000
    sqrt_ac = model.sqrt_alphas_cumprod.clone()
    sqrt_1m_ac = model.sqrt_one_minus_alphas_cumprod.clone()
    use = set(space_timesteps(1000, [args.steps]))
    last, betas = 1.0, []
    for i, ac in enumerate(model.alphas_cumprod):
        if i in use:
            betas.append(1 - ac / last)
            last = ac
    model.register_schedule(given_betas=np.array([b.cpu().numpy() for b in betas]), timesteps=len(betas))
    model.num_timesteps = 1000
    model.ori_timesteps = sorted(use)

    model.context_dim = int(params.unet_config.params.context_dim)
    model.to(run.device)
    if vq is not None:
        vq.to(run.device)
    info["text_encoder"] = text_desc
    return model, vq, (sqrt_ac, sqrt_1m_ac), text_ok, info


def bench_unet(args, run, model):
    torch = run.torch
    g = torch.Generator().manual_seed(1)
    L = args.latent
    ctx_dim = model.context_dim
    x = torch.randn(2, 4, L, L, generator=g).to(run.device)
    lq = torch.randn(1, 4, L, L, generator=g).to(run.device)
    ctx = torch.randn(2, 77, ctx_dim, generator=g).to(run.device)
    t1 = torch.full((1,), 500, dtype=torch.long, device=run.device)
    t2 = torch.full((2,), 500, dtype=torch.long, device=run.device)
    run.reset_peak()
    times = []
    with torch.no_grad(), run.amp():
        for i in range(args.runs + 1):
            run.sync()
            t0 = time.perf_counter()
            feats = model.structcond_stage_model(lq, t1)
            out = model.apply_model(x, t2, ctx, feats)
            run.sync()
            if i:
                times.append(time.perf_counter() - t0)
    assert out.shape == x.shape, out.shape
    return {"what": "unet", "desc": "pytorch reference: time-aware encoder (batch 1) + UNet forward, CFG batch 2",
            "latent": L, "median_s": statistics.median(times), "runs_s": times,
            "out_mean_abs": float(out.float().abs().mean()), **run.peak()}


def bench_codec(args, run, model, vq):
    """The restore's three codec stages on their own, as pfstorer's `bench codec`."""
    torch = run.torch
    S = args.size
    g = torch.Generator().manual_seed(args.seed)
    image = (torch.rand(1, 3, S, S, generator=g) * 2 - 1).to(run.device)
    run.reset_peak()
    times = {"vae_encode": [], "cfw_encode": [], "cfw_decode": []}
    with torch.no_grad(), run.amp():
        for i in range(args.runs + 1):
            run.sync()
            t0 = time.perf_counter()
            latent = model.get_first_stage_encoding(model.encode_first_stage(image))
            run.sync()
            t1 = time.perf_counter()
            _, enc_fea = vq.encode(image)
            run.sync()
            t2 = time.perf_counter()
            out = vq.decode(latent * 1.0 / model.scale_factor, enc_fea)
            run.sync()
            t3 = time.perf_counter()
            if i:
                times["vae_encode"].append(t1 - t0)
                times["cfw_encode"].append(t2 - t1)
                times["cfw_decode"].append(t3 - t2)
    assert out.shape == (1, 3, S, S), out.shape
    return {"what": "codec", "desc": "pytorch reference: VAE encode, CFW encoder features, CFW decode",
            "size": S, "dec_w": args.dec_w, "runs_s": times,
            **{f"{k}_s": statistics.median(v) for k, v in times.items()}, **run.peak()}


def bench_restore(args, run, model, vq, schedule, text_ok):
    torch = run.torch
    S = args.size
    g = torch.Generator().manual_seed(args.seed)
    image = (torch.rand(1, 3, S, S, generator=g) * 2 - 1).to(run.device)
    guided = args.guidance != 1.0
    run.reset_peak()
    torch.manual_seed(args.seed)
    with torch.no_grad(), run.amp():
        run.sync()
        t0 = time.perf_counter()
        # As the tile script: the LQ latent from the diffusion model's VAE, the fusion features
        # from the CFW encoder (a second encoder pass).
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(image))
        run.sync()
        t_enc = time.perf_counter()
        if text_ok:
            cond = model.cond_stage_model([POSITIVE])
            uncond = model.cond_stage_model([NEGATIVE]) if guided else None
        else:
            cond = torch.randn(1, 77, model.context_dim, device=run.device)
            uncond = torch.randn(1, 77, model.context_dim, device=run.device) if guided else None
        noise = torch.randn_like(init_latent)
        t = torch.full((1,), 999, dtype=torch.long, device=run.device)
        x_T = model.q_sample_respace(x_start=init_latent, t=t, sqrt_alphas_cumprod=schedule[0],
                                     sqrt_one_minus_alphas_cumprod=schedule[1], noise=noise)
        run.sync()
        t1 = time.perf_counter()
        kw = dict(cond=cond, struct_cond=init_latent, batch_size=1, timesteps=args.steps,
                  time_replace=args.steps, x_T=x_T, return_intermediates=True, verbose=False,
                  unconditional_conditioning=uncond,
                  unconditional_guidance_scale=args.guidance if guided else None)
        if args.sampler == "canvas":
            # The tile script's tiles: input_size / 8 = 64 latents, overlap 32 (smaller only for
            # smoke tests below 512 px).
            tile = min(64, S // 8)
            samples, _ = model.sample_canvas(tile_size=tile, tile_overlap=tile // 2, batch_size_sample=1, **kw)
        else:
            samples, _ = model.sample(**kw)
        run.sync()
        t2 = time.perf_counter()
        _, enc_fea = vq.encode(image)
        run.sync()
        t_cfw_enc = time.perf_counter()
        out = vq.decode(samples * 1.0 / model.scale_factor, enc_fea)
        out = torch.clamp((out + 1.0) / 2.0, min=0.0, max=1.0)
        run.sync()
        t3 = time.perf_counter()
    assert out.shape == (1, 3, S, S), out.shape
    return {"what": "restore", "desc": "pytorch reference: VAE encode, q_sample(t=999), DDPM loop with CFG, CFW decode",
            "size": S, "steps": args.steps, "guidance": args.guidance, "dec_w": args.dec_w,
            "sampler": args.sampler, "total_s": t3 - t0, "prepare_s": t1 - t0, "sample_s": t2 - t1,
            "decode_s": t3 - t2, "per_step_s": (t2 - t1) / args.steps,
            "vae_encode_s": t_enc - t0, "cfw_encode_s": t_cfw_enc - t2, "cfw_decode_s": t3 - t_cfw_enc,
            "finite": bool(torch.isfinite(out).all()), "out_mean": float(out.float().mean()), **run.peak()}


def main():
    args = parse_args()
    out = sys.stdout  # JSON lines only; everything else goes to stderr

    def emit(record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    root = os.environ.get("STABLESR_ROOT")
    if not root or not os.path.isfile(os.path.join(root, FACE_CONFIG)):
        print(f"gpu_reference: STABLESR_ROOT must point at the StableSR sources (with {FACE_CONFIG}); "
              f"got {root!r}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # the reference prints a lot while building
        folder, absent = install_standins(root)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        run = Run(args)
        t_build = time.perf_counter()
        model, vq, schedule, text_ok, info = build(args, run, root)
        build_s = time.perf_counter() - t_build
        try:
            import ldm.modules.attention as attn

            xformers = bool(getattr(attn, "XFORMERS_IS_AVAILBLE", False))
        except Exception:  # noqa: BLE001
            xformers = False
        common = {
            "impl": "pytorch", "device": args.device, "dtype": args.dtype,
            "precision": "fp32" if args.dtype == "f32" else f"autocast({run.amp_dtype}) over fp32 weights",
            "torch": torch.__version__, "xformers": xformers, "build_s": build_s,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "gpu": torch.cuda.get_device_name(run.device) if args.device == "cuda" else None,
            "standins_for_absent": absent, **info,
        }
        for what in args.what:
            if what == "unet":
                rec = bench_unet(args, run, model)
                rec["text_encoder"] = f"not used: random [2, 77, {model.context_dim}] context"
            elif what == "codec":
                rec = bench_codec(args, run, model, vq)
            else:
                rec = bench_restore(args, run, model, vq, schedule, text_ok)
            emit({**common, **rec})
    return 0


if __name__ == "__main__":
    sys.exit(main())
