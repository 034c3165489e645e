"""The paper's input pipeline, the folder and synthetic data sets, and the
resumable sampler. References are computed independently with numpy
slicing on known pixel arrays."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_ext import data as D

FLOWERS12 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flowers12"


def random_pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_image(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


# --------------------------------------------------------------------------
# Resize / crop geometry
# --------------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(512, 256), (256, 384), (256, 256)])
def test_resize_center_crop_keeps_the_centre(tmp_path, w, h):
    # The shorter side is already 256, so no resampling: the result must be
    # exactly the centre 256x256 window of the PNG's pixels.
    arr = random_pixels(h, w)
    path = write_image(tmp_path / "x.png", arr)
    out = D.resize_center_crop(D.load_image(path))
    top, left = (h - 256) // 2, (w - 256) // 2
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr[top:top + 256, left:left + 256])


@pytest.mark.parametrize("w,h", [(224, 224), (300, 200), (1000, 700), (120, 500)])
def test_resize_shorter_side_then_square(tmp_path, w, h):
    path = write_image(tmp_path / "x.jpg", random_pixels(h, w))
    out = D.resize_center_crop(D.load_image(path))
    assert out.shape == (256, 256, 3)
    # A constant image stays constant through resizing and cropping.
    const = np.full((h, w, 3), (10, 120, 250), np.uint8)
    out = D.resize_center_crop(Image.fromarray(const))
    assert (np.abs(out.astype(int) - (10, 120, 250)) <= 1).all()


def find_window(big, small, up_to_shift=False):
    """(top, left, mirrored) of every placement of `small` inside `big`;
    with up_to_shift, placements where they differ by one constant per channel."""
    hits = []
    c = small.shape[0]
    small = small.astype(np.float64)
    for flip in (False, True):
        cand = small[:, ::-1] if flip else small
        if up_to_shift:
            cand = cand - cand[0, 0]
        for top in range(big.shape[0] - c + 1):
            for left in range(big.shape[1] - c + 1):
                win = big[top:top + c, left:left + c].astype(np.float64)
                if up_to_shift:
                    win = win - win[0, 0]
                if np.allclose(win, cand, rtol=0, atol=1e-3):
                    hits.append((top, left, flip))
    return hits


def test_random_crop_flip_is_a_window_of_the_image():
    arr = random_pixels(40, 40, seed=1)
    seen = set()
    for i in range(60):
        out = D.random_crop_flip(arr, D.sample_rng(0, 0, i), crop=32)
        hits = find_window(arr, out)
        assert len(hits) == 1, "the crop must be exactly one (possibly mirrored) window"
        seen.add(hits[0])
    flips = {h[2] for h in seen}
    tops = {h[0] for h in seen}
    assert flips == {False, True}
    assert min(tops) <= 2 and max(tops) >= 6, f"crop offsets should spread over [0, 8], got {sorted(tops)}"


def test_train_transform_window_plus_constant_shift():
    arr = random_pixels(72, 72, seed=2)
    tf = D.TrainTransform(crop=63)
    for i in range(8):
        rng = D.sample_rng(3, 1, i)
        out = tf(arr, rng)
        assert out.shape == (3, 63, 63) and out.dtype == torch.float32 and out.is_contiguous()
        # Undo the pipeline: + mean gives a window of the image plus one RGB
        # offset (the lighting) for the whole image.
        pix = out.permute(1, 2, 0).numpy().astype(np.float64) + D.IMAGENET_MEAN
        hits = find_window(arr, pix, up_to_shift=True)
        assert len(hits) == 1
        top, left, flip = hits[0]
        window = arr[top:top + 63, left:left + 63][:, ::-1 if flip else 1]
        shift = pix[0, 0] - window[0, 0]
        assert np.abs(shift).max() < 30 and np.abs(shift).max() > 0  # a few sigma of 0.1 * 0.2175 * 255
        # The same (seed, epoch, index) reproduces the sample exactly.
        torch.testing.assert_close(tf(arr, D.sample_rng(3, 1, i)), out, rtol=0, atol=0)


def test_lighting_statistics_match_imagenet_pca():
    rng = np.random.default_rng(1234)
    shifts = np.stack([D.lighting_shift(rng) for _ in range(20000)]).astype(np.float64)
    # Expected: zero mean, covariance V diag((sigma * lambda)^2) V^T on the 0..255 scale.
    v, lam = D.IMAGENET_EIGVEC, D.IMAGENET_EIGVAL
    expected_cov = v @ np.diag((0.1 * lam * 255.0) ** 2) @ v.T
    cov = np.cov(shifts, rowvar=False)
    scale = np.sqrt(np.diag(expected_cov))
    assert np.all(np.abs(shifts.mean(0)) < 4 * scale / np.sqrt(len(shifts)))
    np.testing.assert_allclose(cov, expected_cov, atol=0.05 * expected_cov[0, 0])
    # Along the first principal component the spread is sigma * lambda_1 * 255.
    proj = shifts @ v[:, 0]
    assert abs(proj.std() - 0.1 * lam[0] * 255.0) < 0.03 * 0.1 * lam[0] * 255.0


def test_eval_transform_centre_crop_minus_mean():
    arr = random_pixels(256, 256, seed=3)
    out = D.EvalTransform()(arr)
    expected = arr[16:240, 16:240].astype(np.float32) - D.IMAGENET_MEAN
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)


def test_ten_crop_corners_centre_and_mirrors():
    arr = random_pixels(256, 256, seed=4)
    out = D.EvalTransform(ten_crop=True)(arr)
    assert out.shape == (10, 3, 224, 224)
    pix = (out.permute(0, 2, 3, 1).numpy() + D.IMAGENET_MEAN).round().astype(np.uint8)
    corners = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    for k, (t, l) in enumerate(corners):
        np.testing.assert_array_equal(pix[k], arr[t:t + 224, l:l + 224])
        np.testing.assert_array_equal(pix[k + 5], arr[t:t + 224, l:l + 224][:, ::-1])


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------

def test_synthetic_is_deterministic_by_seed():
    a = D.SyntheticShapes(30, num_classes=6, seed=7, size=96)
    b = D.SyntheticShapes(30, num_classes=6, seed=7, size=96)
    c = D.SyntheticShapes(30, num_classes=6, seed=8, size=96)
    val = D.SyntheticShapes(30, num_classes=6, seed=7, size=96, split="val")
    for i in (0, 5, 29):
        np.testing.assert_array_equal(a.render(i), b.render(i))
        assert not np.array_equal(a.render(i), c.render(i))
        assert not np.array_equal(a.render(i), val.render(i))
    assert not np.array_equal(a.render(0), a.render(6))  # same class, different image
    assert a.render(3).shape == (96, 96, 3) and a.render(3).dtype == np.uint8
    labels = [a[i][1] for i in range(30)]
    assert sorted(labels) == sorted(list(range(6)) * 5)


def test_synthetic_classes_differ_in_colour():
    # The class colour must be a usable feature: the mean foreground hue of two
    # classes differs more than two images of one class do.
    ds = D.SyntheticShapes(40, num_classes=4, seed=0, size=64)

    def colour(i):
        img = ds.render(i).astype(np.float64)
        sat = img.max(-1) - img.min(-1)
        return img[sat > np.percentile(sat, 90)].mean(0)  # the most saturated pixels: the shape

    same = np.linalg.norm(colour(0) - colour(4))
    other = np.linalg.norm(colour(0) - colour(2))
    assert other > 2 * same


def test_synthetic_errors():
    with pytest.raises(ValueError, match="num_classes"):
        D.SyntheticShapes(10, num_classes=1)
    with pytest.raises(ValueError, match="split"):
        D.SyntheticShapes(10, split="test")
    with pytest.raises(IndexError):
        D.SyntheticShapes(10).render(10)


def test_dataset_augmentation_depends_on_epoch_not_on_call_order():
    ds = D.SyntheticShapes(8, num_classes=4, size=72, transform=D.TrainTransform(crop=63), aug_seed=5)
    x1, _ = ds[(3, 0)]
    ds[(4, 0)]
    x2, _ = ds[(3, 0)]
    x3, _ = ds[(3, 1)]
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    assert not torch.equal(x1, x3)


# --------------------------------------------------------------------------
# Folder data set
# --------------------------------------------------------------------------

def make_folder(root, classes=("a", "b"), per_class=3, split="train", size=(80, 60)):
    for ci, name in enumerate(classes):
        for j in range(per_class):
            write_image(root / split / name / f"{j}.jpg", random_pixels(size[1], size[0], seed=10 * ci + j))
    return root


def test_image_folder_reads_classes_and_images(tmp_path):
    make_folder(tmp_path, classes=("cat", "dog", "emu"), per_class=2)
    ds = D.ImageFolderDataset(tmp_path, "train", D.TrainTransform(crop=63), size=72)
    assert ds.classes == ["cat", "dog", "emu"] and len(ds) == 6
    x, y = ds[(5, 0)]
    assert x.shape == (3, 63, 63) and y == 2


def test_image_folder_accepts_test_for_val(tmp_path):
    make_folder(tmp_path, split="test")
    ds = D.ImageFolderDataset(tmp_path, "val", D.EvalTransform(crop=63), size=72)
    assert ds.split_dir.endswith("test")


def test_image_folder_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        D.ImageFolderDataset(tmp_path / "nope", "train", D.EvalTransform())
    make_folder(tmp_path, classes=("a", "b"))
    with pytest.raises(FileNotFoundError, match="missing the 'val' split"):
        D.ImageFolderDataset(tmp_path, "val", D.EvalTransform())
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty contains no images"):
        D.ImageFolderDataset(tmp_path, "train", D.EvalTransform())
    make_folder(tmp_path, classes=("a", "c"), split="val")
    with pytest.raises(ValueError, match="differ from the training split"):
        D.ImageFolderDataset(tmp_path, "val", D.EvalTransform(), classes=["a", "b"])
    (tmp_path / "noclasses" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.ImageFolderDataset(tmp_path / "noclasses", "train", D.EvalTransform())


def test_corrupt_images_are_logged_and_skipped(tmp_path, caplog):
    make_folder(tmp_path, classes=("a", "b"), per_class=3)
    garbage = tmp_path / "train" / "a" / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG at all")
    good = (tmp_path / "train" / "b" / "0.jpg").read_bytes()
    truncated = tmp_path / "train" / "b" / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    ds = D.ImageFolderDataset(tmp_path, "train", D.TrainTransform(crop=63), size=72)
    assert len(ds) == 8
    bad = {i for i, (p, _) in enumerate(ds.samples) if p in (str(garbage), str(truncated))}
    with caplog.at_level(logging.WARNING, logger="alexnet_ext.data"):
        for i in bad:
            assert ds[(i, 0)] is None
    assert str(garbage) in caplog.text and str(truncated) in caplog.text
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=D.collate_skip_none,
                                         sampler=D.ResumableSampler(ds, shuffle=False))
    sizes = [len(b[1]) for b in loader if b is not None]
    assert sum(sizes) == len(ds) - len(bad)
    assert D.collate_skip_none([None, None]) is None


# --------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------

def test_resumable_sampler_skips_and_keys_by_epoch():
    ds = list(range(23))
    s = D.ResumableSampler(ds, seed=3)
    s.set_position(2)
    full = list(s)
    assert sorted(i for i, _ in full) == list(range(23)) and {e for _, e in full} == {2}
    s.set_position(2, skip=10)
    assert list(s) == full[10:] and len(s) == 13
    s.set_position(3)
    assert [i for i, _ in s] != [i for i, _ in full]  # a fresh permutation each epoch


def test_resumable_sampler_shards_across_ranks():
    ds = list(range(10))
    shards = []
    for rank in range(3):
        s = D.ResumableSampler(ds, num_replicas=3, rank=rank, seed=1)
        s.set_position(0)
        shards.append([i for i, _ in s])
    assert all(len(sh) == 4 for sh in shards)  # padded to equal length, like DistributedSampler
    assert set().union(*map(set, shards)) == set(range(10))


# --------------------------------------------------------------------------
# flowers12 (a real JPEG set; skipped where it is absent)
# --------------------------------------------------------------------------

@pytest.mark.skipif(not FLOWERS12.is_dir(), reason=f"{FLOWERS12} not present")
def test_flowers12_pipeline():
    train = D.ImageFolderDataset(FLOWERS12, "train", D.TrainTransform())
    val = D.ImageFolderDataset(FLOWERS12, "val", D.EvalTransform(ten_crop=True), classes=train.classes)
    assert train.num_classes == 12 and len(train) == 720 and len(val) == 240
    x, y = train[(0, 0)]
    assert x.shape == (3, 224, 224) and 0 <= y < 12
    # Mean-subtracted pixels: roughly centred, on the 0..255 scale.
    assert -128 < float(x.mean()) < 128 and float(x.std()) > 10
    xv, _ = val[len(val) - 1]
    assert xv.shape == (10, 3, 224, 224)
