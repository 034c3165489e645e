"""The AlexNet paper's input pipeline, an ImageNet-style folder data set and a
procedurally generated synthetic data set.

Pipeline (Krizhevsky et al. 2012, section 3 and 4.1):
  decode with Pillow -> resize the shorter side to 256 -> centre crop 256x256
  training:   random 224x224 crop, random horizontal flip, PCA colour
              lighting (sigma 0.1), per-channel mean subtraction
  evaluation: the centre 224x224 crop, or (ten-crop) the four corners and the
              centre plus their mirrors.
Pixels stay on the paper's 0..255 scale (minus the mean), not 0..1.

Every random choice for a training sample comes from a generator seeded by
(seed, epoch, index), never from a global RNG: a sample is the same whether
it is loaded in the main process or a worker, before or after a resume, so an
interrupted-and-resumed run sees exactly the batches an uninterrupted one sees.
The sampler therefore yields ``(index, epoch)`` keys (see ResumableSampler).
"""
import logging
import math
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger("alexnet_ext.data")

RESIZE = 256
CROP = 224

# Per-channel ImageNet mean (RGB) on the 0..255 scale.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
# Principal components of ImageNet's RGB pixel values (pixels on the 0..1
# scale; multiplied by 255 where applied): eigenvalues, and the eigenvectors
# as the columns of IMAGENET_EIGVEC.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float64)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], dtype=np.float64)
LIGHTING_STD = 0.1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


# ---------------------------------------------------------------------------
# Pipeline steps
# ---------------------------------------------------------------------------

def load_image(path, size=RESIZE):
    """Decodes an image file to RGB. For JPEGs much larger than `size`, the
    decoder is asked to downscale by a power of two while decoding (never
    below `size` on the shorter side), which makes ImageNet-sized photos
    several times cheaper to read."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img = img.convert("RGB")  # forces the full decode inside the `with`
    return img


def resize_center_crop(img, size=RESIZE):
    """Shorter side to `size` (bilinear, antialiased when shrinking), then the
    centre `size` x `size` square. Returns an HxWx3 uint8 array."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def lighting_shift(rng, std=LIGHTING_STD):
    """The paper's PCA colour augmentation: one RGB offset (0..255 scale) added
    to every pixel, sum_i alpha_i * lambda_i * p_i with alpha_i ~ N(0, std)."""
    alpha = rng.normal(0.0, std, size=3)
    return (IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL) * 255.0).astype(np.float32)


def to_tensor(arr, offset):
    """HxWx3 uint8 (any strides) -> 3xHxW float32 tensor of arr - offset."""
    out = arr.astype(np.float32)
    out -= offset
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def random_crop_flip(arr, rng, crop=CROP):
    """A random `crop` x `crop` window, mirrored left-right with probability 1/2."""
    h, w = arr.shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    out = arr[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def center_crop(arr, crop=CROP):
    h, w = arr.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return arr[top:top + crop, left:left + crop]


def ten_crop_windows(h, w, crop=CROP):
    """(top, left) of the four corner crops and the centre crop."""
    return [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), ((h - crop) // 2, (w - crop) // 2)]


class TrainTransform:
    """Random crop + flip + PCA lighting + mean subtraction (paper, section 4.1)."""

    def __init__(self, crop=CROP, lighting_std=LIGHTING_STD):
        self.crop, self.lighting_std = crop, lighting_std

    def __call__(self, arr, rng):
        out = random_crop_flip(arr, rng, self.crop)
        offset = IMAGENET_MEAN
        if self.lighting_std > 0:
            offset = IMAGENET_MEAN - lighting_shift(rng, self.lighting_std)
        return to_tensor(out, offset)


class EvalTransform:
    """Centre crop (3x224x224), or with ten_crop=True the ten crops (10x3x224x224)."""

    def __init__(self, crop=CROP, ten_crop=False):
        self.crop, self.ten_crop = crop, ten_crop

    def __call__(self, arr, rng=None):
        if self.ten_crop:
            # Converted once, then cut: the five windows and their mirrors.
            full, c = to_tensor(arr, IMAGENET_MEAN), self.crop
            five = torch.stack([full[:, t:t + c, l:l + c] for t, l in ten_crop_windows(*arr.shape[:2], c)])
            return torch.cat([five, five.flip(-1)])
        return to_tensor(center_crop(arr, self.crop), IMAGENET_MEAN)


# ---------------------------------------------------------------------------
# Data sets. __getitem__ takes an int or an (index, epoch) key; a training
# transform draws its randomness from sample_rng(seed, epoch, index).
# ---------------------------------------------------------------------------

def sample_rng(seed, epoch, index):
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def _split_key(key):
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


class ImageFolderDataset(Dataset):
    """``ROOT/<split>/<class>/<image>`` (ImageNet layout). Classes are the
    sorted sub-folder names. A file that cannot be decoded is logged with its
    path and yields None (dropped from its batch by `collate_skip_none`)."""

    def __init__(self, root, split, transform, aug_seed=0, classes=None, size=RESIZE):
        self.root = os.fspath(root)
        self.split_dir = resolve_split(self.root, split)
        found = sorted(e.name for e in os.scandir(self.split_dir) if e.is_dir())
        if not found:
            raise ValueError(f"{self.split_dir} has no class sub-folders; expected "
                             f"{self.split_dir}/<class>/<image>.jpg")
        if classes is not None and list(classes) != found:
            only_here = sorted(set(found) - set(classes))
            missing = sorted(set(classes) - set(found))
            raise ValueError(f"the classes of {self.split_dir} differ from the training split's: "
                             f"missing {missing[:5]}, extra {only_here[:5]}")
        self.classes = found
        self.samples = []
        for label, name in enumerate(found):
            folder = os.path.join(self.split_dir, name)
            files = sorted(f for f in os.listdir(folder)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not files:
                raise ValueError(f"class folder {folder} contains no images "
                                 f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(os.path.join(folder, f), label) for f in files]
        self.transform, self.aug_seed, self.size = transform, aug_seed, size
        self._reported = set()

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = _split_key(key)
        path, label = self.samples[index]
        try:
            arr = resize_center_crop(load_image(path, self.size), self.size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            if path not in self._reported:
                self._reported.add(path)
                log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return self.transform(arr, sample_rng(self.aug_seed, epoch, index)), label


def resolve_split(root, split):
    """ROOT/<split>, accepting test/ where val/ is asked for; a clear error otherwise."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: no such folder (expected {root}/train/<class>/*.jpg "
                                f"and {root}/val/<class>/*.jpg)")
    names = [split] + (["test"] if split == "val" else [])
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"--data {root}: missing the '{split}' split: expected a folder "
                            f"{' or '.join(os.path.join(root, n) for n in names)} with one sub-folder per class")


def collate_skip_none(batch):
    """default_collate over the samples that loaded; None if none did."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


# ---------------------------------------------------------------------------
# Synthetic data: class-dependent shapes, colours and textures, rendered on
# the fly from (seed, split, index) so any image can be regenerated exactly.
# ---------------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "ring", "cross")


def _hsv_to_rgb(h, s, v):
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


class SyntheticShapes(Dataset):
    """A procedurally generated image classification set.

    Class c is a shape (SHAPES[c % 5]), a hue (classes spread around the
    colour wheel) and a stripe texture (frequency and angle depend on c);
    each image varies position, size, rotation, hue, background and noise.
    Images are 256x256 (the size the pipeline crops 224 from) and the label
    of image i is i % num_classes, so every class is equally frequent.
    """

    SPLIT_IDS = {"train": 0, "val": 1}

    def __init__(self, num_images, num_classes=10, seed=0, split="train", transform=None, size=RESIZE,
                 aug_seed=0):
        if num_classes < 2:
            raise ValueError(f"SyntheticShapes: num_classes must be >= 2, got {num_classes}")
        if num_images < 1:
            raise ValueError(f"SyntheticShapes: num_images must be >= 1, got {num_images}")
        if split not in self.SPLIT_IDS:
            raise ValueError(f"SyntheticShapes: split must be 'train' or 'val', got {split!r}")
        self.num_images, self.num_classes, self.seed = int(num_images), int(num_classes), int(seed)
        self.split, self.size, self.transform, self.aug_seed = split, int(size), transform, aug_seed
        self.classes = [f"class{c:02d}_{SHAPES[c % len(SHAPES)]}" for c in range(self.num_classes)]
        ys, xs = np.mgrid[0:self.size, 0:self.size].astype(np.float32)
        self._grid = ((xs + 0.5) / self.size * 2 - 1, (ys + 0.5) / self.size * 2 - 1)

    def __len__(self):
        return self.num_images

    def label(self, index):
        return index % self.num_classes

    def render(self, index):
        """Image `index` as an HxWx3 uint8 array (deterministic)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticShapes: index {index} out of range [0, {self.num_images})")
        c = self.label(index)
        rng = np.random.default_rng([self.seed, self.SPLIT_IDS[self.split], index])
        x, y = self._grid
        cx, cy = rng.uniform(-0.35, 0.35, size=2)
        radius = rng.uniform(0.35, 0.6)
        theta = rng.uniform(0, 2 * math.pi)
        u = ((x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)) / radius
        v = (-(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)) / radius
        shape = SHAPES[c % len(SHAPES)]
        if shape == "disc":
            mask = u * u + v * v < 1
        elif shape == "square":
            mask = np.maximum(np.abs(u), np.abs(v)) < 0.8
        elif shape == "triangle":
            mask = (v > -0.5) & (v < 1 - 1.732 * np.abs(u) * 0.9)
        elif shape == "ring":
            r2 = u * u + v * v
            mask = (r2 < 1) & (r2 > 0.36)
        else:  # cross
            mask = (np.minimum(np.abs(u), np.abs(v)) < 0.28) & (np.maximum(np.abs(u), np.abs(v)) < 1)
        # Stripes inside the shape: frequency and angle are class features.
        freq = 3.0 + 2.0 * (c % 3)
        angle = math.pi * ((c * 0.618) % 1.0)
        stripes = 0.75 + 0.25 * np.sign(np.sin(freq * math.pi * (u * math.cos(angle) + v * math.sin(angle))))
        hue = (c / self.num_classes + rng.uniform(-0.02, 0.02)) % 1.0
        fg = np.array(_hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)), dtype=np.float32)
        bg = np.array(_hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.6)), dtype=np.float32)
        img = np.where(mask[..., None], fg * stripes[..., None], bg)
        img = img * 255.0 + rng.normal(0.0, 12.0, size=img.shape).astype(np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)

    def __getitem__(self, key):
        index, epoch = _split_key(key)
        arr = self.render(index)
        if self.transform is None:
            return arr, self.label(index)
        return self.transform(arr, sample_rng(self.aug_seed, epoch, index)), self.label(index)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded permutation per epoch, one shard per rank)
    that yields ``(index, epoch)`` keys and can start mid-epoch: after
    ``set_position(epoch, skip)`` the first `skip` samples of this rank's
    shard are left out, so a resumed run continues with the very next batch.
    Works without a process group when num_replicas and rank are given."""

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_position(self, epoch, skip=0):
        self.set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return max(0, self.num_samples - self.skip)


def ignore_sigint_in_worker(_worker_id):
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group; the
    main process decides how to stop (finish the step, checkpoint), so the
    workers must not die first."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
