"""LightningDataModules: digits (bundled, the default), Fashion-MNIST (Debian's package),
CIFAR-10/100, ImageFolder, synthetic.

Each exposes `num_classes` and `in_chans` before `setup()`, so the model can be built from them,
and checks in its constructor that its files exist, so a wrong path fails before any training.
"""

from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    DataLoader,
    Dataset,
    Subset,
    TensorDataset,
)

from q8.lit.errors import DatasetNotFoundError, UsageError
from q8.lit.train_order import TrainOrder
from q8.lit.validate import check_data_config


def _split_indices(
    labels: np.ndarray, fractions: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test indices; `fractions` are the val and test shares."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    val_frac, test_frac = fractions
    rest, test = train_test_split(idx, test_size=test_frac, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_frac / (1 - test_frac), stratify=labels[rest], random_state=seed
    )
    return train, val, test


class _ClassificationDataModule(L.LightningDataModule):
    num_classes: int
    in_chans: int
    image_size: int  # side of the square training images (q8.lit.validate checks the model)

    def __init__(
        self, batch_size: int, num_workers: int = 0, eval_batch_size: int | None = None
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size}
        check_data_config({**sizes, "num_workers": num_workers})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._train_order = TrainOrder()  # shuffled, and resumable mid-epoch

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "setup() was not called"
        kwargs = {
            "batch_size": self.batch_size if train else self.eval_batch_size,
            # BatchNorm (and Range BN) cannot normalise a final batch of one sample
            "drop_last": train and len(dataset) > self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
        if train:
            return self._train_order.loader(dataset, self.trainer, **kwargs)
        return DataLoader(dataset, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Where a checkpoint leaves the training epoch (q8.lit.train_order.TrainOrder):
        Lightning would otherwise resume mid-epoch with a fresh permutation, on other batches."""
        return self._train_order.state_dict(self.trainer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_order.load_state_dict(self.trainer, state)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class DigitsDataModule(_ClassificationDataModule):
    """scikit-learn's 1,797 bundled 8x8 handwritten digits, upsampled; never downloads.

    The stratified train/val/test split depends only on `split_seed`, so runs with different
    training seeds are evaluated on the same test images. Training batches get a random small
    rotation, scaling and shift (`augment`), the classic remedy for a small digits set.
    """

    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        max_rotation: float = 10.0,
        max_shift: float = 0.1,
        max_scale: float = 0.1,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        check_data_config({"image_size": image_size})
        self.augment = augment
        self.affine = (max_rotation, max_shift, max_scale)
        if not (
            0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise UsageError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be "
                "in (0, 1) with a sum below 1"
            )
        self.image_size = image_size
        self.fractions = (val_fraction, test_fraction)
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        pixels, labels = load_digits(return_X_y=True)
        x = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        y = torch.tensor(labels, dtype=torch.long)
        train, val, test = _split_indices(labels, self.fractions, self.split_seed)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment and self.trainer is not None and self.trainer.training:
            x, y = batch
            return random_affine(x, *self.affine), y
        return batch


class FashionMNISTDataModule(_ClassificationDataModule):
    """Fashion-MNIST (Zalando; 60,000 training and 10,000 test 28x28 images, 10 classes) from
    its four IDX files in `root`, by default where `apt-get install dataset-fashion-mnist` puts
    them. `val_size` images are held out of the training set, stratified by `split_seed`;
    `train_size` keeps a stratified subset of the rest; t10k is the test set."""

    PACKAGE = "dataset-fashion-mnist"
    PACKAGE_DIR = "/usr/share/datasets/fashion-mnist"
    FILES: ClassVar[dict[str, str]] = {
        "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
    }
    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
    # Pixel mean and std on [0, 1] over all 60,000 training images (tests/test_fashion_mnist.py
    # recomputes them from the files): fixed, so that a checkpoint sees the same inputs whatever
    # split or subset it is tested with.
    MEAN, STD = 0.28604, 0.35302
    NATIVE_SIZE = 28
    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 28,
        batch_size: int = 128,
        val_size: int = 5000,
        train_size: int | None = None,
        split_seed: int = 0,
        augment: bool = True,
        hflip: bool = True,
        max_rotation: float = 0.0,
        max_shift: float = 0.1,
        max_scale: float = 0.0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        check_data_config({"image_size": image_size})
        n_train = 60_000
        for key, value, low, high in (("val_size", val_size, 10, n_train - 10),
                                      ("train_size", train_size, 10, n_train - val_size)):
            # at least one image of each class in train and in val
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not low <= value <= high):
                raise UsageError(f"data.{key}={value!r} is invalid: it must be an integer in "
                                 f"{low}..{high}" + (" or null" if key == "train_size" else ""))
        self.root = Path(root or self.PACKAGE_DIR)
        self.paths = {key: self._find(name) for key, name in self.FILES.items()}
        shapes = {key: read_idx_header(path)[1] for key, path in self.paths.items()}
        for split in ("train", "test"):
            images, labels = shapes[f"{split}_images"], shapes[f"{split}_labels"]
            if len(images) != 3 or images[1:] != (28, 28) or labels != images[:1]:
                raise IdxFormatError(
                    f"{self.paths[f'{split}_images']} and {self.paths[f'{split}_labels']} are not "
                    f"Fashion-MNIST: images {images}, labels {labels}; expected (N, 28, 28), (N,)")
        if (shapes["train_labels"][0], shapes["test_labels"][0]) != (n_train, 10_000):
            raise IdxFormatError(f"{self.paths['train_labels']} and "
                                 f"{self.paths['test_labels']} hold {shapes['train_labels'][0]} "
                                 f"and {shapes['test_labels'][0]} images, not Fashion-MNIST's "
                                 f"{n_train} and 10000")
        self.image_size = image_size
        self.val_size = val_size
        self.train_size = train_size
        self.split_seed = split_seed
        self.augment = augment
        self.hflip = hflip
        self.affine = (max_rotation, max_shift, max_scale)
        self.split: dict[str, np.ndarray] = {}  # indices into the 60,000 training images

    def _find(self, name: str) -> Path:
        """`root`/<name>.gz, or the uncompressed <name> (as torchvision's raw folder holds it)."""
        for candidate in (self.root / f"{name}.gz", self.root / name):
            if candidate.is_file():
                return candidate
        install = f"apt-get install -y {self.PACKAGE}"
        where = (f"install it with `{install}` (it puts them in {self.PACKAGE_DIR})"
                 if str(self.root) == self.PACKAGE_DIR else
                 f"point data.root at the folder that holds them, or `{install}` and leave "
                 f"data.root unset ({self.PACKAGE_DIR})")
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: looked for {self.root / name}.gz (or {name}); {where}")

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One split's images, normalised and resized to `image_size`, and labels."""
        images = read_idx(self.paths[f"{split}_images"])
        labels = read_idx(self.paths[f"{split}_labels"])
        if images.dtype != np.uint8 or labels.dtype != np.uint8 or labels.max() >= 10:
            raise IdxFormatError(
                f"{self.paths[f'{split}_images']}: expected uint8 pixels and labels 0..9, got "
                f"{images.dtype} pixels and labels up to {labels.max()}")
        x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
        x = x.sub_(self.MEAN).div_(self.STD)
        if self.image_size != self.NATIVE_SIZE:  # as digits: bilinear, then the model's size
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x, torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self._load("train")
        # val is a prefix of one seeded order: the same whatever train_size, and a smaller
        # train_size keeps a subset of a larger one's images
        order = stratified_order(y.numpy(), self.split_seed)
        val, rest = order[: self.val_size], order[self.val_size :]
        rest = rest[: self.train_size]  # None: all
        self.split = {"train": np.sort(rest), "val": np.sort(val)}
        train, val = (torch.from_numpy(self.split[k]) for k in ("train", "val"))
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(*self._load("test"))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment and self.trainer is not None and self.trainer.training:
            x, y = batch
            if self.hflip:  # clothes are mirror-symmetric, unlike digits
                flip = torch.rand(x.shape[0], device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            return random_affine(x, *self.affine), y
        return batch


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of `range(len(labels))` whose every prefix holds each class in
    proportion to its count, to within two images: each class's images in random order,
    interleaved by their rank within the class (with classes of equal counts: in rounds of one
    image per class, each round in random order)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    _, cls, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(perm))
    rank[by_class] = np.arange(len(perm)) - np.repeat(starts, counts)
    position = (rank + 0.5) / counts[cls]  # where each image falls in its class, in (0, 1)
    return perm[np.lexsort((rng.random(len(perm)), position))]


class IdxFormatError(UsageError, ValueError):
    """A file that is not a well-formed IDX file (the MNIST format) or not the expected data."""


# IDX type codes (the third byte of the magic number): numpy dtypes, big-endian
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_idx(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _parse_idx_header(head: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or head[3] == 0:
        raise IdxFormatError(
            f"{path} is not an IDX file: its magic number is {head[:4].hex() or 'missing'}, "
            f"expected 0000 + a type code ({', '.join(f'{t:02x}' for t in _IDX_TYPES)}) + the "
            "number of dimensions (>= 1)")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise IdxFormatError(f"{path}: IDX header truncated: {ndim} dimensions announced, "
                             f"{(len(head) - 4) // 4} present")
    shape = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return _IDX_TYPES[head[2]], shape


def read_idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape an IDX file (gzipped if its name ends in .gz) announces; reads only
    its header. A malformed header is an IdxFormatError."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 else b""
    except (OSError, EOFError) as ex:  # gzip's BadGzipFile is an OSError without a filename
        raise IdxFormatError(f"cannot read {path}: {type(ex).__name__}: {ex}") from ex
    return _parse_idx_header(head, path)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped if its name ends in .gz) as an array of its dtype
    and shape, in native byte order; a bad magic number, a truncated header or a body that is
    not exactly the announced size is an IdxFormatError."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            data = f.read()
    except (OSError, EOFError) as ex:
        raise IdxFormatError(f"cannot read {path}: {type(ex).__name__}: {ex}") from ex
    dtype, shape = _parse_idx_header(data[:4 + 4 * data[3]] if len(data) >= 4 else data, path)
    offset = 4 + 4 * len(shape)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        announced = f"{'x'.join(map(str, shape))} {dtype.name} = {expected} bytes"
        raise IdxFormatError(f"{path}: IDX body is {len(data) - offset} bytes, but its header "
                             f"announces {announced}")
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def random_affine(
    x: torch.Tensor, max_rotation: float, max_shift: float, max_scale: float
) -> torch.Tensor:
    """Rotate by up to `max_rotation` degrees, shift by up to `max_shift` of the side and scale
    by up to 1 +- `max_scale`, independently per image (on the batch's device)."""
    n = x.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=x.device) * 2 - 1

    angle = uniform(n) * math.radians(max_rotation)
    zoom = 1 + uniform(n) * max_scale
    shift = uniform(n, 2) * max_shift * 2  # affine_grid's coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class CIFARDataModule(_ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 from `root` (torchvision layout); downloads only if `download`.

    The official training set is split into train and val (`val_size` images, by `split_seed`);
    the official test set is the test set. Training uses random crop (pad 4) and flip.
    """

    _FOLDERS: ClassVar[dict[int, str]] = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
    image_size = 32
    _STATS: ClassVar[dict[int, tuple[tuple[float, ...], tuple[float, ...]]]] = {
        10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }
    in_chans = 3

    def __init__(
        self,
        root: str = "data",
        num_classes: int = 10,
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        split_seed: int = 0,
        num_workers: int = 4,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        if num_classes not in self._FOLDERS:
            raise UsageError(
                f"data.num_classes={num_classes!r} is invalid for CIFAR: use 10 or 100"
            )
        self.root = Path(root)
        self.num_classes = num_classes
        self.download = download
        self.val_size = val_size
        self.split_seed = split_seed
        folder = self.root / self._FOLDERS[num_classes]
        if not download and not folder.is_dir():
            raise DatasetNotFoundError(
                f"CIFAR-{num_classes} not found: looked for {folder}; add data.download=true to "
                f"fetch it into data.root={root}, or point data.root at the folder that holds "
                f"{self._FOLDERS[num_classes]}"
            )

    def _dataset_class(self):
        from torchvision import datasets

        return datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset_class()(str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T

        normalize = T.Normalize(*self._STATS[self.num_classes])
        augment = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
        plain = T.Compose([T.ToTensor(), normalize])
        cls = self._dataset_class()
        train_aug = cls(str(self.root), train=True, transform=augment)
        train_plain = cls(str(self.root), train=True, transform=plain)
        perm = torch.randperm(
            len(train_aug), generator=torch.Generator().manual_seed(self.split_seed)
        )
        self.train_set = Subset(train_aug, perm[self.val_size :].tolist())
        self.val_set = Subset(train_plain, perm[: self.val_size].tolist())
        self.test_set = cls(str(self.root), train=False, transform=plain)


class ImageFolderDataModule(_ClassificationDataModule):
    """Any ImageFolder tree (root/<split>/<class>/<image>), e.g. ImageNet, with timm's transforms.

    ImageNet has no labelled test set, so by default its `val` folder serves as val and test.
    """

    in_chans = 3

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str = "val",
        image_size: int = 224,
        crop_pct: float = 0.875,
        auto_augment: str | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        check_data_config({"image_size": image_size})
        self.root = Path(root)
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        classes = None
        for split, name in self.dirs.items():
            found = _class_folders(self.root / name, split)
            if classes is not None and found != classes:
                missing = sorted(set(classes) ^ set(found))[:5]
                raise DatasetNotFoundError(
                    f"the {split} folder {self.root / name} has other classes than "
                    f"{self.root / train_dir}: {', '.join(missing)} in one of them only"
                )
            classes = found
        self.num_classes = len(classes)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.auto_augment = auto_augment

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from timm.data import create_transform

        train_tf = create_transform(
            self.image_size, is_training=True, auto_augment=self.auto_augment
        )
        eval_tf = create_transform(self.image_size, is_training=False, crop_pct=self.crop_pct)
        self.train_set = SkippingImageFolder(str(self.root / self.dirs["train"]), train_tf)
        self.val_set = SkippingImageFolder(str(self.root / self.dirs["val"]), eval_tf)
        self.test_set = SkippingImageFolder(str(self.root / self.dirs["test"]), eval_tf)


def _class_folders(folder: Path, split: str) -> list[str]:
    """The class folders of one split, each checked to hold at least one image file; a missing,
    unreadable or empty folder is a DatasetNotFoundError naming it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder for {split} not found: looked for {folder} "
            f"(layout <data.root>/<split>/<class>/<image>); set data.root=<dir> "
            f"(for ImageNet, the folder with train/ and val/ sorted into class folders)"
        )
    try:
        classes = sorted(p for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise DatasetNotFoundError(f"no class folders in {folder}")
        for c in classes:
            if not any(f.suffix.lower() in IMG_EXTENSIONS for f in c.rglob("*")):
                raise DatasetNotFoundError(
                    f"class folder {c} holds no image ({', '.join(IMG_EXTENSIONS)})")
    except OSError as ex:
        raise DatasetNotFoundError(f"cannot read {ex.filename or folder}: {ex.strerror}") from ex
    return [c.name for c in classes]


class SkippingImageFolder(Dataset):
    """torchvision's ImageFolder, but an image that cannot be decoded (truncated, corrupt, not
    an image) is skipped with a warning naming it: its index yields the next image that can be,
    so a bad file in a million does not stop a run, batches keep their size and a seeded run
    stays reproducible. More than `max_skips` bad files in a row is an error."""

    max_skips = 16

    def __init__(self, root: str, transform: Any) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, transform=transform)
        self.classes = self.folder.classes
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for k in range(self.max_skips + 1):
            i = (index + k) % len(self.folder)
            try:
                return self.folder[i]
            except (OSError, ValueError, SyntaxError) as ex:  # what PIL raises on bad files
                path = self.folder.samples[i][0]
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping image {path}: {type(ex).__name__}: {ex}",
                                  stacklevel=2)
        raise UsageError(f"{self.max_skips + 1} images in a row from {self.folder.root} cannot "
                         f"be read, from {self.folder.samples[index][0]} on")


class _RandomImages(Dataset):
    """`length` images cycled from a pool of random tensors, with fixed random labels."""

    def __init__(self, length: int, shape: tuple[int, ...], num_classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.length = length
        self.pool = torch.randn((min(length, 256), *shape), generator=g)
        self.labels = torch.randint(0, num_classes, (length,), generator=g)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[i % len(self.pool)], self.labels[i]


class SyntheticDataModule(_ClassificationDataModule):
    """Random images of any shape and class count: for benchmarks, nothing to learn."""

    def __init__(
        self,
        num_samples: int = 1024,
        image_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        check_data_config({"num_samples": num_samples, "image_size": image_size,
                           "in_chans": in_chans, "num_classes": num_classes})
        self.num_samples = num_samples
        self.shape = (in_chans, image_size, image_size)
        self.image_size = image_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n_eval = max(1, self.num_samples // 8)
        self.train_set = _RandomImages(self.num_samples, self.shape, self.num_classes, self.seed)
        self.val_set = _RandomImages(n_eval, self.shape, self.num_classes, self.seed + 1)
        self.test_set = _RandomImages(n_eval, self.shape, self.num_classes, self.seed + 2)
