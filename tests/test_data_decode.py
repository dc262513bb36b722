"""Tests of anomalib_study.data.decode: every image kind becomes 8-bit RGB; bad files raise DataError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomalib_study.data import ImageRecord, content_hash, load_image, load_mask
from anomalib_study.data.decode import ellipse_mask
from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import sha256_bytes


def _png(tmp_path, image, name="x.png", **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_grayscale_becomes_rgb(tmp_path):
    path = _png(tmp_path, Image.fromarray(np.full((4, 6), 77, np.uint8), "L"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert (np.asarray(image) == 77).all()


def test_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 257 * (0, 1, 128, 255)
    path = _png(tmp_path, Image.fromarray(values))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    pixels = np.asarray(load_image(path))[0, :, 0]
    assert pixels.tolist() == [0, 1, 128, 255]


def test_32bit_integer_mode_is_scaled_as_16bit(tmp_path):
    image = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.int32), mode="I")
    path = _png(tmp_path, image, name="i.tif")
    assert np.asarray(load_image(path))[0, :, 1].tolist() == [0, 255, 128]


def test_palette_cmyk_and_alpha(tmp_path):
    palette = Image.new("P", (3, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((1, 0), 1)
    path = _png(tmp_path, palette, name="p.png", transparency=0)
    pixels = np.asarray(load_image(path))
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[0, 1].tolist() == [0, 0, 255]

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    path = tmp_path / "c.jpg"
    cmyk.save(path, quality=100)
    red = np.asarray(load_image(path)).astype(int)
    assert red[..., 0].min() > 230 and red[..., 1].max() < 25 and red[..., 2].max() < 25

    rgba = Image.new("RGBA", (2, 2), (200, 10, 20, 0))  # fully transparent: alpha is dropped
    pixels = np.asarray(load_image(_png(tmp_path, rgba, name="a.png")))
    assert pixels.shape == (2, 2, 3) and pixels[0, 0].tolist() == [200, 10, 20]

    la = Image.new("LA", (2, 2), (90, 0))
    assert np.asarray(load_image(_png(tmp_path, la, name="la.png")))[1, 1].tolist() == [90, 90, 90]


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((2, 4, 3), np.uint8)
    array[0, 0] = (255, 255, 255)  # a white pixel in the top-left corner of the stored image
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=100)
    upright = np.asarray(load_image(path))
    assert upright.shape[:2] == (4, 2)  # width and height swapped
    assert upright[0, -1].mean() > 200  # the corner moved to the top right
    assert load_mask(ImageRecord(path, "test", 0)).shape == (4, 2)  # all-normal mask matches


@pytest.mark.parametrize("kind", ["zero", "truncated", "corrupt", "missing", "folder"])
def test_bad_files_raise_data_error_naming_the_file(tmp_path, kind):
    good = _png(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    path = tmp_path / f"{kind}.png"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "corrupt":
        path.write_bytes(b"this is not an image at all" * 10)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(DataError, match=str(path.name)):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    source = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(source)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(source.read_bytes()[:600])
    with pytest.raises(DataError, match="truncated|cannot be decoded"):
        load_image(cut)


def test_load_mask_file_threshold_resize(tmp_path):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    path = _png(tmp_path, Image.fromarray(values, "L"), name="m.png")
    assert load_mask(path).tolist() == [[False, False, True, True]]
    assert load_mask(path, threshold=0).tolist() == [[False, True, True, True]]
    record = ImageRecord(tmp_path / "img.png", "test", 1, "d", path, mask_threshold=0)
    assert load_mask(record).tolist() == [[False, True, True, True]]
    resized = load_mask(path, size=(8, 2))
    assert resized.shape == (2, 8) and resized.dtype == bool
    assert resized[0].tolist() == [False] * 4 + [True] * 4


def test_load_mask_binary_and_16bit(tmp_path):
    one = Image.new("1", (3, 1))
    one.putpixel((2, 0), 1)
    assert load_mask(_png(tmp_path, one, name="b.bmp")).tolist() == [[False, False, True]]
    sixteen = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert load_mask(_png(tmp_path, sixteen, name="s.png")).tolist() == [[False, True]]


def test_load_mask_folder_is_union(tmp_path):
    folder = tmp_path / "000"
    folder.mkdir()
    a = np.zeros((2, 3), np.uint8)
    a[0, 0] = 255
    b = np.zeros((2, 3), np.uint8)
    b[1, 2] = 200
    Image.fromarray(a).save(folder / "000.png")
    Image.fromarray(b).save(folder / "001.png")
    mask = load_mask(folder)
    assert mask.sum() == 2 and mask[0, 0] and mask[1, 2]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(folder / "002.png")
    with pytest.raises(DataError, match="must match"):
        load_mask(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no mask"):
        load_mask(empty)


def test_load_mask_none(tmp_path):
    image = _png(tmp_path, Image.new("RGB", (5, 3)), name="i.png")
    mask = load_mask(ImageRecord(image, "train", 0))
    assert mask.shape == (3, 5) and not mask.any()
    assert load_mask(None, size=(4, 2)).shape == (2, 4)
    with pytest.raises(ParameterError):
        load_mask(None)


def test_content_hash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert content_hash(path) == sha256_bytes(b"abc")
    with pytest.raises(DataError):
        content_hash(tmp_path / "nope.png")


def test_ellipse_mask_orientation():
    flat = ellipse_mask((21, 21), [(8, 1, 0.0, 10, 10)])
    assert flat[10, 3] and flat[10, 17] and not flat[3, 10]
    upright = ellipse_mask((21, 21), [(8, 1, np.pi / 2, 10, 10)])
    assert upright[3, 10] and upright[17, 10] and not upright[10, 3]
    rising = ellipse_mask((21, 21), [(8, 1, np.pi / 4, 10, 10)])
    assert rising[5, 15] and not rising[5, 5]  # counter-clockwise as displayed: up and to the right


def test_image_files_one_listing_rule(tmp_path):
    from anomalib_study.data.decode import image_files

    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "B.JPG", "sub/c.bmp", ".hidden.png", "notes.txt", "sub/d.tiff"):
        (root / name).write_bytes(b"x")
    (root / ".git").mkdir()
    (root / ".git" / "e.png").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.png").write_bytes(b"x")
    (root / "link.png").symlink_to(outside / "f.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a loop must end
    names = [p.relative_to(root).as_posix() for p in image_files(root)]
    assert names == ["B.JPG", "a.png", "dangling.jpg", "link.png", "linked/f.png", "sub/c.bmp", "sub/d.tiff"]
    assert [p.name for p in image_files(root, recursive=False)] == ["B.JPG", "a.png", "dangling.jpg", "link.png"]
    assert image_files(tmp_path / "missing") == []


def test_find_unreadable_names_every_broken_file(tmp_path):
    from anomalib_study.data.decode import find_unreadable

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    bad = find_unreadable([good, tmp_path / "zero.png", tmp_path / "text.jpg", tmp_path / "missing.png"])
    assert list(bad) == [tmp_path / "zero.png", tmp_path / "text.jpg", tmp_path / "missing.png"]
    assert "empty (0 bytes)" in bad[tmp_path / "zero.png"] and "cannot be decoded" in bad[tmp_path / "text.jpg"]
    assert "does not exist" in bad[tmp_path / "missing.png"]
    assert find_unreadable([good]) == {}
