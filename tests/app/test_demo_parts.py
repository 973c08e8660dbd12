"""Demo building blocks: procedural data, image folders, evaluation classifier, FID, plots."""
import math
import time

import pytest
import torch

from diffcr.app.demo import (CLASS_NAMES, NUM_CLASSES, ShapeClassifier, accuracy, class_accuracy,
                         classifier_fid, features, frechet_distance, load_image_folder,
                         make_shapes, plot_ratio_heatmap, plot_router_maps, plot_samples,
                         predict, save_image_folder, shape_masks, train_classifier)

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ data
def test_make_shapes_deterministic_and_seed_dependent():
    x1, y1 = make_shapes(60, seed=7)
    x2, y2 = make_shapes(60, seed=7)
    x3, y3 = make_shapes(60, seed=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert not torch.equal(y1, y3)


def test_make_shapes_does_not_touch_global_rng():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    make_shapes(10, seed=1)
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("size", [16, 32])
def test_make_shapes_range_dtype_balance(size):
    x, y = make_shapes(605, size=size, seed=1)
    assert x.shape == (605, 3, size, size) and x.dtype == torch.float32
    assert y.shape == (605,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and torch.isfinite(x).all()
    counts = torch.bincount(y, minlength=NUM_CLASSES)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 605
    assert not torch.equal(y[:NUM_CLASSES * 3], torch.arange(NUM_CLASSES * 3) % NUM_CLASSES)
    # textured, not flat: every image varies
    assert (x.flatten(1).std(1) > 0.02).all()


def test_make_shapes_num_classes_and_errors():
    _, y = make_shapes(40, seed=0, num_classes=3)
    assert set(y.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError):
        make_shapes(4, num_classes=7)
    x, y = make_shapes(0)
    assert x.shape == (0, 3, 32, 32) and y.shape == (0,)


def test_masks_inside_image_nonempty_and_sized():
    x, y, m = make_shapes(300, size=32, seed=3, return_masks=True)
    assert m.shape == (300, 32, 32) and m.dtype == torch.bool
    area = m.flatten(1).sum(1)
    assert (area > 0).all()
    # fully inside: the shape never touches the outermost pixel ring
    border = m[:, 0, :] | m[:, -1, :] | m[:, :, 0] | m[:, :, -1]
    assert not border.any()
    # extent about 20-45 % of the side
    rows, cols = m.any(2), m.any(1)
    ext = torch.maximum(rows.sum(1), cols.sum(1)).float() / 32
    assert ext.min() >= 0.12 and ext.max() <= 0.5
    # the shape differs from its surroundings
    fg = (x * m[:, None]).sum((2, 3)) / area[:, None]
    bg = (x * ~m[:, None]).sum((2, 3)) / (32 * 32 - area[:, None])
    assert ((fg - bg).abs().max(1).values > 0.2).float().mean() > 0.95
    assert torch.equal(shape_masks(300, size=32, seed=3), m)
    x2, y2 = make_shapes(300, size=32, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_make_shapes_spread_moves_shapes_towards_the_centre():
    """spread=0 centres every shape; spread=1 is the default; the other draws do not change."""
    def centres(m):
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        w = m.float()
        return torch.stack([(w * ys).sum((1, 2)), (w * xs).sum((1, 2))], 1) / w.sum((1, 2))[:, None]

    x1, y1, m1 = make_shapes(200, size=32, seed=4, return_masks=True)
    xd, yd, md = make_shapes(200, size=32, seed=4, return_masks=True, spread=1.0)
    assert torch.equal(x1, xd) and torch.equal(m1, md)
    x0, y0, m0 = make_shapes(200, size=32, seed=4, return_masks=True, spread=0.0)
    assert torch.equal(y0, y1)
    assert torch.equal(m0.flatten(1).sum(1) > 0, torch.ones(200, dtype=torch.bool))
    off0 = (centres(m0) - 15.5).abs().amax(1)
    off1 = (centres(m1) - 15.5).abs().amax(1)
    assert off0.max() < 1.5          # centred (up to the shapes' own asymmetry)
    assert off1.mean() > 3 * off0.mean()
    off3 = (centres(make_shapes(200, size=32, seed=4, return_masks=True, spread=0.3)[2])
            - 15.5).abs().amax(1)
    assert off0.mean() < off3.mean() < off1.mean()


def test_make_shapes_mono_and_scale():
    """mono: the shape is near-white or near-black and contrasts with the background; scale
    grows the shapes; the labels and the other draws stay."""
    x, y, m = make_shapes(200, size=16, seed=6, return_masks=True)
    xm, ym, mm = make_shapes(200, size=16, seed=6, return_masks=True, mono=True)
    assert torch.equal(y, ym) and torch.equal(m, mm)
    # fully covered shape pixels are grey +-0.9 in every channel (edges are anti-aliased)
    grey = ((xm.abs() - 0.9).abs() < 1e-5).all(1) & (xm[:, 0] == xm[:, 1]) & mm
    assert grey.flatten(1).any(1).float().mean() > 0.95
    assert not ((x.abs() - 0.9).abs() < 1e-5).all(1).flatten(1).any(1).float().mean() > 0.5
    fg = (xm * mm[:, None]).sum((2, 3)) / mm.sum((1, 2))[:, None]
    bg = (xm * ~mm[:, None]).sum((2, 3)) / (~mm).sum((1, 2))[:, None]
    assert ((fg - bg).abs().mean(1) > 0.3).float().mean() > 0.95
    _, _, big = make_shapes(200, size=16, seed=6, return_masks=True, scale=1.6)
    assert big.flatten(1).sum(1).float().mean() > 2 * m.flatten(1).sum(1).float().mean()
    border = big[:, 0, :] | big[:, -1, :] | big[:, :, 0] | big[:, :, -1]
    assert not border.any()
    with pytest.raises(ValueError, match="scale must be in"):
        make_shapes(4, size=16, scale=2.5)


def test_make_shapes_speed_smoke():
    # timing is printed, never asserted (machines vary); the budget is ~2 s for 10k images
    t = time.perf_counter()
    x, _ = make_shapes(10_000, seed=0)
    print(f"make_shapes(10000): {time.perf_counter() - t:.2f} s")
    assert x.shape[0] == 10_000


# ------------------------------------------------------------------ image folders
def test_image_folder_round_trip(tmp_path):
    x, y = make_shapes(30, size=16, seed=5)
    root = save_image_folder(x, y, tmp_path / "shapes")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASS_NAMES)
    xl, yl, names = load_image_folder(root, size=16)
    assert names == list(CLASS_NAMES)
    # loaded class by class, files in input order within a class
    order = torch.cat([torch.nonzero(y == k).flatten() for k in range(NUM_CLASSES)])
    assert torch.equal(yl, y[order])
    assert xl.shape == x.shape and xl.dtype == torch.float32
    assert (xl - x[order]).abs().max() <= 1 / 127.5 + 1e-6
    # resized load keeps labels; sizes follow the request
    xs, ys, _ = load_image_folder(root, size=8)
    assert xs.shape == (30, 3, 8, 8) and torch.equal(ys, yl)
    assert xs.min() >= -1 and xs.max() <= 1


def test_image_folder_without_classes_file_and_crop(tmp_path):
    from PIL import Image

    for cls, color in (("b_red", (255, 0, 0)), ("a_blue", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 10), color).save(tmp_path / cls / "x.JPG")
        Image.new("L", (12, 12), 128).save(tmp_path / cls / "y.png")
    (tmp_path / "a_blue" / "notes.txt").write_text("not an image")
    x, y, names = load_image_folder(tmp_path, size=8)
    assert names == ["a_blue", "b_red"] and y.tolist() == [0, 0, 1, 1]
    assert x.shape == (4, 3, 8, 8)
    assert x[0, 2].mean() > 0.9 and x[0, 0].mean() < -0.9          # blue after resize + crop
    assert x[1].abs().max() < 0.05                                  # grey -> RGB


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_image_folder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no class subfolders"):
        load_image_folder(empty)
    (empty / "cats").mkdir()
    (empty / "cats" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*no images"):
        load_image_folder(empty)
    for err in (FileNotFoundError, ValueError):
        try:
            load_image_folder(missing if err is FileNotFoundError else empty)
        except err as e:
            assert "\n" not in str(e)


# ------------------------------------------------------------------ classifier
@pytest.fixture(scope="module")
def clf():
    x, y = make_shapes(3000, size=32, seed=11)
    t = time.perf_counter()
    model = train_classifier(x, y, NUM_CLASSES, steps=300, batch=64, seed=0)
    print(f"train_classifier(300 steps): {time.perf_counter() - t:.1f} s")
    return model


@pytest.fixture(scope="module")
def heldout():
    return make_shapes(900, size=32, seed=12345)


def test_classifier_heldout_accuracy(clf, heldout):
    x, y = heldout
    assert isinstance(clf, ShapeClassifier) and not clf.training
    acc = accuracy(clf, x, y)
    assert acc > 0.9, acc
    assert class_accuracy(clf, x, y) == acc
    p = predict(clf, x[:10])
    assert p.shape == (10,) and p.dtype == torch.int64


def test_classifier_features_and_other_sizes(clf, heldout):
    x, _ = heldout
    f = features(clf, x[:300], batch=128)
    assert f.shape == (300, 64) and f.dtype == torch.float32 and not f.requires_grad
    assert torch.allclose(f, features(clf, x[:300], batch=7), atol=1e-5)
    m = ShapeClassifier(4)
    assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert m(torch.zeros(2, 3, 64, 48)).shape == (2, 4)
    assert features(m, torch.zeros(0, 3, 16, 16)).shape == (0, 64)


def test_train_classifier_deterministic():
    x, y = make_shapes(64, size=16, seed=2)
    a = train_classifier(x, y, NUM_CLASSES, steps=3, batch=16, seed=4)
    b = train_classifier(x, y, NUM_CLASSES, steps=3, batch=16, seed=4)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_classifier_fid_real_vs_shifted(clf, heldout):
    x, _ = heldout
    same = classifier_fid(clf, x[:450], x[450:])
    blurred = classifier_fid(clf, x[:450], torch.nn.functional.avg_pool2d(
        x[450:], 3, 1, 1))
    noise = classifier_fid(clf, x[:450], torch.rand(450, 3, 32, 32) * 2 - 1)
    assert same < blurred < noise


# ------------------------------------------------------------------ Frechet distance
def _exact_cov_samples(mean, cov, n=50, seed=0):
    """Samples whose sample mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    lz = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(lz, z.T, upper=False).T              # cov(z) = I
    return z @ torch.linalg.cholesky(cov).T + mean


def _sqrtm_denman_beavers(a, iters=60):
    y, z = a.clone(), torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(iters):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    return y


def test_frechet_identical_symmetric_and_monotone():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g)
    b = torch.randn(200, 8, generator=g) * 1.3 + 0.2
    assert frechet_distance(a, a) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9, abs=1e-9)
    d = [frechet_distance(a, a + s) for s in (0.1, 0.5, 1.0)]
    assert d[0] < d[1] < d[2]
    assert d[2] == pytest.approx(8.0, rel=1e-6)      # pure shift: ||dmu||^2, covariances equal
    assert frechet_distance(a.numpy(), b.numpy()) == pytest.approx(frechet_distance(a, b))


def test_frechet_matches_closed_form_3d():
    mu_a = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    mu_b = torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
    # commuting (diagonal) covariances: Tr term = sum (sqrt(a_i) - sqrt(b_i))^2
    ca = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    cb = torch.diag(torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64))
    a, b = _exact_cov_samples(mu_a, ca, seed=1), _exact_cov_samples(mu_b, cb, seed=2)
    expect = 0.25 + 1.0 + 1.0 + ((ca.diag().sqrt() - cb.diag().sqrt()) ** 2).sum().item()
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)
    # general covariances: compare with sqrtm(Ca Cb) by the Denman-Beavers iteration
    ca = torch.tensor([[2.0, 0.6, 0.1], [0.6, 1.0, -0.3], [0.1, -0.3, 0.5]], dtype=torch.float64)
    cb = torch.tensor([[1.0, -0.4, 0.0], [-0.4, 3.0, 0.8], [0.0, 0.8, 1.5]], dtype=torch.float64)
    a, b = _exact_cov_samples(mu_a, ca, seed=3), _exact_cov_samples(mu_b, cb, seed=4)
    tr = _sqrtm_denman_beavers(ca @ cb).trace()
    expect = ((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * tr
    assert frechet_distance(a, b) == pytest.approx(expect.item(), rel=1e-8)


def test_frechet_small_and_degenerate_inputs(recwarn):
    a = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]])          # n = 2 < d: rank-1 covariance
    b = torch.tensor([[0.5, 0.0, 2.0], [1.0, 2.0, 1.0]])
    d = frechet_distance(a, b)
    assert math.isfinite(d) and d > 0
    c = torch.zeros(5, 4)                                            # zero covariance
    assert frechet_distance(c, c) == 0.0
    assert frechet_distance(c, c + 1) == pytest.approx(4.0)
    assert frechet_distance(torch.randn(10, 1), torch.randn(10, 1)) >= 0
    assert not recwarn.list
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


# ------------------------------------------------------------------ plots
def _check_png(path):
    from PIL import Image

    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) < 1_000_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 50 and im.size[1] > 50


def test_plot_ratio_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    table = torch.tensor([[0.9, 0.8, 0.7, 0.6], [1.0, 0.75, 0.5, 0.55], [0.8, 0.8, 0.8, 0.8]])
    p = plot_ratio_heatmap(table, [1, 2, 5], tmp_path / "sub" / "dir" / "ratios.png",
                           num_train_timesteps=1000, title="test")
    _check_png(p)
    p2 = plot_ratio_heatmap(table.tolist()[0], [0], tmp_path / "one.png")
    _check_png(p2)
    with pytest.raises(ValueError):
        plot_ratio_heatmap(table, [1, 2], tmp_path / "bad.png")


def test_plot_router_maps(tmp_path):
    pytest.importorskip("matplotlib")
    x, _ = make_shapes(2, size=16, seed=0)
    maps = torch.rand(2, 2, 3, 4, 4)
    maps[0, 0, 0] = 0.5                                              # constant map is fine
    p = plot_router_maps(x, maps, tmp_path / "maps" / "router.png", block_labels=[0, "mid"],
                         timestep_labels=[900, 500, "t=100"])
    _check_png(p)
    _check_png(plot_router_maps(x, maps.flatten(3), tmp_path / "flat.png"))
    with pytest.raises(ValueError):
        plot_router_maps(x, maps, tmp_path / "bad.png", block_labels=[0])


def test_plot_samples(tmp_path):
    pytest.importorskip("matplotlib")
    x, y = make_shapes(4, size=16, seed=0)
    rows = {"dense": x, "DiffCR-LT": x.flip(3), "short": x[:2]}
    p = plot_samples(rows, tmp_path / "s" / "samples.png", class_names=CLASS_NAMES, labels=y)
    _check_png(p)
    _check_png(plot_samples({"only": x}, tmp_path / "plain.png"))
    with pytest.raises(ValueError):
        plot_samples({}, tmp_path / "empty.png")
