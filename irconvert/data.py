"""Data for a recipe: Fashion-MNIST, MNIST, CIFAR-10/100 (held in memory as uint8 tensors, batches
normalized and augmented as they are collated) and ImageNet-style folders (torchvision ImageFolder
with timm's transforms).

Fashion-MNIST is read from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
when it is there, else from torchvision's download into `root`.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .errors import IRConvertError
from .recipe import DataSection

_STATS = {  # per-channel mean, std of the training images
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NATIVE = {  # classes, channels, image size of the in-memory datasets, known without reading them
    "fashion-mnist": (10, 1, 28), "mnist": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32),
}
_DEBIAN = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
_IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclass(frozen=True)
class DataInfo:
    """What the model must fit: classes, channels, image size."""

    num_classes: int
    in_chans: int
    image_size: int


@dataclass
class Data:
    train: Dataset
    val: Dataset
    info: DataInfo
    train_collate: Optional[Callable] = None
    val_collate: Optional[Callable] = None

    def loaders(self, cfg: DataSection, generator: torch.Generator, seed: int = 0, rank: int = 0, world: int = 1):
        """Return (train, val) DataLoaders for process `rank` of `world`; batch_size is per process.

        Training shuffles with a DistributedSampler (also for one process, so that N processes with
        batch B see the same images as one with batch N*B); validation gives each process every
        world-th image, unpadded, so that summed counts cover the split exactly once."""
        sampler = DistributedSampler(self.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        train = DataLoader(self.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                           collate_fn=self.train_collate, generator=generator,
                           drop_last=len(self.train) > cfg.batch_size * world)
        val = DataLoader(self.val, batch_size=cfg.val_batch_size or cfg.batch_size,
                         sampler=range(rank, len(self.val), world), num_workers=cfg.workers,
                         collate_fn=self.val_collate)
        return train, val


def _read_idx(path: Path) -> torch.Tensor:
    """Return the uint8 tensor of a (gzipped) IDX file, the MNIST format, or raise IRConvertError
    naming the file when it is truncated, not gzip, or not IDX."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # EOFError: a truncated .gz
        raise IRConvertError(f"{path}: cannot read ({type(exc).__name__}: {str(exc)[:100]}); the file is "
                             "truncated or corrupt, download it again") from None
    ndim = raw[3] if len(raw) > 4 and raw[:3] == b"\0\0\x08" else 0
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if not 1 <= ndim <= 3 or len(body) != math.prod(dims):
        raise IRConvertError(f"{path}: not a whole uint8 IDX file ({len(body)} data bytes for shape {dims}); "
                             "download it again")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _root(cfg: DataSection) -> Path:
    if cfg.root:
        return Path(cfg.root)
    debian = _DEBIAN.get(cfg.dataset)
    if debian and Path(debian).is_dir():
        return Path(debian)
    return Path("data") / cfg.dataset


def _small(cfg: DataSection, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (uint8 images N x C x H x W, int64 labels) of an in-memory dataset."""
    root = _root(cfg)
    if cfg.dataset in ("fashion-mnist", "mnist"):
        img, lab = (root / f for f in _IDX[split])
        if img.is_file() and lab.is_file():
            x, y = _read_idx(img), _read_idx(lab)
            if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
                raise IRConvertError(f"{img}, {lab}: {tuple(x.shape)} images but {tuple(y.shape)} labels; "
                                     "the files do not belong together")
            return x.unsqueeze(1), y.long()
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
    try:
        ds = cls[cfg.dataset](str(root), train=split == "train", download=cfg.download)
    except RuntimeError as exc:
        hint = ("install Debian's dataset-fashion-mnist or " if cfg.dataset == "fashion-mnist" else "")
        raise IRConvertError(f"data.root: {root} has no {cfg.dataset} files ({str(exc).splitlines()[0]}); "
                             f"{hint}set data.root to the folder or data.download: true") from None
    except Exception as exc:  # network errors of the download
        raise IRConvertError(f"data: cannot download {cfg.dataset} into {root} ({type(exc).__name__}: "
                             f"{str(exc)[:120]}); put the files there or set data.root") from None
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(ds.targets).long()


def _subset(n: int, limit: Optional[int], seed: int) -> Optional[torch.Tensor]:
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


class _Collate:
    """uint8 batch -> normalized float batch, resized, with random crop/flip when training."""

    def __init__(self, mean, std, size: int, train: bool, hflip: float, pad: int):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.size, self.train, self.hflip, self.pad = size, train, hflip, pad

    def __call__(self, batch):
        x = torch.stack([b[0] for b in batch]).float().div_(255)
        y = torch.stack([b[1] for b in batch])
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.train and self.pad:
            n, _, h, w = x.shape
            x = F.pad(x, (self.pad,) * 4)
            dx, dy = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, :, dy:dy + h, dx:dx + w]
        if self.train and self.hflip:
            flip = torch.rand(x.shape[0]) < self.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean) / self.std, y


def build_data(cfg: DataSection) -> Data:
    """Return the train and validation sets the recipe's data section describes."""
    if cfg.dataset == "imagefolder":
        return _imagefolder(cfg)
    xs, ys = _small(cfg, "train")
    xv, yv = _small(cfg, "val")
    if len(xs) == 0 or len(xv) == 0:
        raise IRConvertError(f"data.root: {_root(cfg)} holds an empty {cfg.dataset} split")
    keep = _subset(len(xs), cfg.subset, 0)
    if keep is not None:
        xs, ys = xs[keep], ys[keep]
    keep = _subset(len(xv), cfg.val_subset, 1)
    if keep is not None:
        xv, yv = xv[keep], yv[keep]
    mean, std = _STATS[cfg.dataset]
    size = cfg.image_size or xs.shape[-1]
    info = DataInfo(num_classes=int(max(ys.max(), yv.max())) + 1, in_chans=xs.shape[1], image_size=size)
    return Data(
        TensorDataset(xs, ys), TensorDataset(xv, yv), info,
        _Collate(mean, std, size, True, cfg.hflip, cfg.crop_padding),
        _Collate(mean, std, size, False, 0.0, 0),
    )


def data_info(cfg: DataSection) -> DataInfo:
    """Return the classes, channels and image size the data section gives a model, without loading the
    images (an image folder's classes are its train/ sub-folders)."""
    if cfg.dataset != "imagefolder":
        classes, chans, size = _NATIVE[cfg.dataset]
        return DataInfo(classes, chans, cfg.image_size or size)
    train = Path(cfg.root or ".") / "train"
    if not cfg.root or not train.is_dir():
        raise IRConvertError(f"data.root: {train} not found; an image folder has train/ and val/, "
                             "each with one sub-folder per class")
    return DataInfo(sum(p.is_dir() for p in train.iterdir()), 3, cfg.image_size or 224)


def _imagefolder(cfg: DataSection) -> Data:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    if not cfg.root:
        raise IRConvertError("data.root: imagefolder needs a root with train/ and val/ class folders")
    root = Path(cfg.root)
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise IRConvertError(f"data.root: {folder} not found; an image folder has train/ and val/, "
                                 "each with one sub-folder per class")
        size = cfg.image_size or 224
        kw = dict(cfg.timm_transform)
        if split == "train":
            kw.setdefault("hflip", cfg.hflip)
        try:
            tf = create_transform(size, is_training=split == "train", **kw)
            splits[split] = ImageFolder(str(folder), transform=tf)
        except FileNotFoundError as exc:
            raise IRConvertError(f"data.root: {folder} holds no images ({exc})") from None
        except TypeError as exc:
            raise IRConvertError(f"data.timm_transform: {exc}") from None
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        raise IRConvertError(f"data.root: {root}/train and {root}/val have different class folders")
    subset_t, subset_v = _subset(len(train), cfg.subset, 0), _subset(len(val), cfg.val_subset, 1)
    if subset_t is not None:
        train = torch.utils.data.Subset(train, subset_t.tolist())
    if subset_v is not None:
        val = torch.utils.data.Subset(val, subset_v.tolist())
    return Data(train, val, DataInfo(len(splits["train"].classes), 3, cfg.image_size or 224))


def calibration_batch(data: Data, n: int = 64) -> torch.Tensor:
    """Return the first n training images, the same on every run, resume and export (augmentation seeded):
    the batch on which binarize checks the binary inputs (calibrate.py)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        items = [data.train[i] for i in range(min(n, len(data.train)))]
        return (data.val_collate or torch.utils.data.default_collate)(items)[0]
