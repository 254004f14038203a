"""genfast.data.images: digits, procedural shapes, the CycleGAN domains, image folders and their errors."""

import pytest
import torch

from genfast.data import images
from genfast.data.images import COLORS, batch_indices, digits, image_folder, load_images, shape_domains, shapes


def test_shapes_are_deterministic_and_labelled():
    a, b = shapes(40, 16, seed=3), shapes(40, 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, shapes(40, 16, seed=4).images)
    assert a.images.shape == (40, 3, 16, 16) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert a.num_classes == 9 and a.class_names[0] == "red circle" and a.class_names[-1] == "blue triangle"
    assert a.labels.min() >= 0 and a.labels.max() < 9
    palette = torch.tensor(list(COLORS.values())) * 2 - 1
    background = torch.tensor([0.95, 0.95, 0.92]) * 2 - 1
    for image, label in zip(a.images, a.labels):
        pixels = image.flatten(1).T  # (H*W, 3)
        drawn = pixels[(pixels - background).abs().sum(1) > 1e-5]
        assert len(drawn) > 0
        # every drawn pixel has the colour the label names
        torch.testing.assert_close(drawn, palette[int(label) % 3].expand_as(drawn))
    gray = shapes(8, 16, channels=1, seed=3)
    assert gray.images.shape == (8, 1, 16, 16)
    with pytest.raises(ValueError, match="shape_names"):
        shapes(4, 16, shape_names=("hexagon",))
    with pytest.raises(ValueError, match="n must be"):
        shapes(0)


def test_shape_domains_differ():
    a, b = shape_domains(6, 16)
    assert set(a.class_names) == {"red circle", "green circle", "blue circle"}
    assert set(b.class_names) == {"red square", "green square", "blue square"}


def test_digits_shape_and_range():
    pytest.importorskip("sklearn")
    data = digits(32, 1)
    assert data.images.shape == (1797, 1, 32, 32) and data.labels.shape == (1797,)
    assert data.images.min() >= -1 and data.images.max() <= 1 and data.images.min() < -0.99
    assert data.class_names == tuple(str(i) for i in range(10)) and set(data.labels.tolist()) == set(range(10))
    assert digits(16, 3).images.shape == (1797, 3, 16, 16)
    with pytest.raises(ValueError, match="image_size"):
        digits(2)
    with pytest.raises(ValueError, match="channels"):
        digits(32, 2)


def test_image_folder_labels_resize_and_errors(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 10), color).save(tmp_path / cls / "a.png")
        Image.new("RGB", (30, 30), color).save(tmp_path / cls / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = image_folder(tmp_path, 8)
    assert data.images.shape == (4, 3, 8, 8) and data.class_names == ("cats", "dogs")
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.images[0, 0].min() > 0.95 and data.images[3, 2].min() > 0.95  # red cats, blue dogs
    assert image_folder(tmp_path, 8, channels=1).images.shape == (4, 1, 8, 8)
    assert load_images(str(tmp_path), 8).images.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="is 30x30 but"):
        image_folder(tmp_path)  # mixed sizes without image_size
    flat = tmp_path / "cats"
    assert image_folder(flat, 8).labels is None
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        image_folder(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_folder(empty)
    (empty / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot read image .*x.png"):
        image_folder(empty, 8)


def test_batch_indices():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(batch_indices(10, 5, g1), batch_indices(10, 5, g2))
    with pytest.raises(ValueError, match="empty"):
        batch_indices(0, 5, g1)
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 0, g1)
    assert images.grid_rows(10) == 4
