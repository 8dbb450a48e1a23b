"""The evaluation protocols against the official evaluation code on the same features (fixtures written by
tests/fixtures/generate/eval_protocols.py): MSN's low-shot logistic regression, DINOv2's k-NN and linear-probe
input, the 224-px eval transforms of MSN and DINOv2, and I-JEPA's average-pooled probe features."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from parity_helpers import fixtures_of_kind, load_fixture
from test_vit_parity import build_ijepa_encoder
from visrep.data.splits import uint8_eval_transform
from visrep.eval import knn_classify, linear_input, lowshot_logreg, preprocess_features
from visrep.eval.knn import knn_scores
from visrep.eval.lowshot import MSN_LAMBDA, fit_logistic_eval, fit_logreg_cyanure, have_cyanure
from visrep.hub import dinov2_vit

needs_cyanure = pytest.mark.requires("cyanure")


def _msn_objective(x, y, w, lambd):
    return float(F.cross_entropy(x @ w, y) + 0.5 * lambd * (w * w).sum())


@pytest.mark.parametrize("path", fixtures_of_kind("msn_logistic_eval"))
def test_msn_logistic_eval_preprocessing_and_lambda(path):
    fx = load_fixture(path)
    t = fx.tensors
    tr, te = preprocess_features(t["in.train_embs"], t["in.test_embs"], mode="rows")
    fx.assert_close("out.train_embs_pre", tr)
    fx.assert_close("out.test_embs_pre", te)
    fx.assert_close("out.lambd", torch.tensor(MSN_LAMBDA / len(tr), dtype=torch.float64))
    assert fx.config["lambd_default"] == MSN_LAMBDA


@needs_cyanure
@pytest.mark.parametrize("path", fixtures_of_kind("msn_logistic_eval"))
def test_msn_logistic_eval_cyanure(path):
    """Our cyanure call (the default solver when installed) gives the official weights, predictions and score;
    so does lowshot_logreg on a split that is the whole training set."""
    fx = load_fixture(path)
    t = fx.tensors
    x, y = t["out.train_embs_pre"], t["in.train_labs"]
    n_classes = fx.config["n_classes"]
    w = fit_logreg_cyanure(x, y, n_classes, float(t["out.lambd"]))
    fx.assert_close("out.coef", w)
    assert torch.equal((t["out.test_embs_pre"] @ w).argmax(1), t["out.test_pred"])
    res = lowshot_logreg(t["in.train_embs"], y, t["in.test_embs"], t["in.test_labs"],
                         settings=(fx.config["n_train_per_class"],), n_splits=1, solver="cyanure")
    assert res["variant"] == "logistic_eval" and res["solver"] == "cyanure"
    (r,) = res["settings"].values()
    assert r["n_train"] == len(y) and r["mean"] == pytest.approx(100 * float(t["out.test_score"]), abs=1e-9)


@pytest.mark.parametrize("path", fixtures_of_kind("msn_logistic_eval"))
def test_msn_logistic_eval_lbfgs_within_cyanure_tolerance(path):
    """Without cyanure, L-BFGS solves the same problem: its objective is no worse than the official weights' and
    within cyanure's stopping rule (relative duality gap 1e-3) of it; the test predictions agree."""
    fx = load_fixture(path)
    t = fx.tensors
    x, y, lambd = t["out.train_embs_pre"], t["in.train_labs"], float(t["out.lambd"])
    w = fit_logistic_eval(x, y, fx.config["n_classes"], lambd, "lbfgs")
    ours, official = _msn_objective(x, y, w, lambd), float(t["out.objective"])
    assert official == pytest.approx(_msn_objective(x, y, t["out.coef"], lambd), rel=1e-12)
    assert ours <= official * (1 + 1e-9) and official - ours <= 1e-3 * official
    pred = (t["out.test_embs_pre"] @ w).argmax(1)
    agree = float((pred == t["out.test_pred"]).double().mean())
    assert agree >= 0.97, agree
    res = lowshot_logreg(t["in.train_embs"], y, t["in.test_embs"], t["in.test_labs"],
                         settings=(fx.config["n_train_per_class"],), n_splits=1, solver="lbfgs")
    (r,) = res["settings"].values()
    assert r["mean"] == pytest.approx(100 * float(t["out.test_score"]), abs=100 * (1 - agree) + 1e-9)


def test_cyanure_is_used_when_installed():
    res = lowshot_logreg(torch.randn(20, 4), torch.arange(4).repeat(5), torch.randn(8, 4), torch.arange(4).repeat(2),
                         settings=(2,), n_splits=1)
    assert res["solver"] == ("cyanure" if have_cyanure() else "lbfgs")


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_knn"))
def test_dinov2_knn(path):
    fx = load_fixture(path)
    t = fx.tensors
    ks, T = fx.config["nb_knn"], fx.config["T"]
    assert ks == [10, 20, 100, 200] and T == 0.07
    args = (t["in.train_features"], t["in.train_labels"], t["in.test_features"])
    scores = knn_scores(*args, ks=ks, temperature=T, num_classes=fx.config["n_classes"])
    for k in ks:
        fx.assert_close(f"out.probas.{k}", scores[k])
    acc = knn_classify(*args, t["in.test_labels"], ks=ks, temperature=T, chunk_size=7)  # chunked like ImageNet
    for k in ks:
        fx.assert_close(f"out.top1.{k}", torch.tensor(acc[k], dtype=torch.float64))


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_linear_input"))
def test_dinov2_linear_input(path):
    fx = load_fixture(path)
    cfg = dict(fx.config["DinoVisionTransformer"])
    vit = dinov2_vit(**cfg).double().eval()
    vit.load_state_dict(fx.prefixed("state."), strict=True)
    with torch.no_grad():
        for n in (1, 4):
            for avg in (True, False):
                out = linear_input(vit, fx.tensors["in.images"], n_blocks=n, avgpool=avg)
                fx.assert_close(f"out.linear_input.n{n}_{'avgpool' if avg else 'cls'}", out)


@pytest.mark.parametrize("path", fixtures_of_kind("eval_transform"))
def test_eval_transform_224(path):
    """Resize(256) + CenterCrop(224) as MSN (bilinear) and DINOv2 (bicubic) do it, on non-square images."""
    fx = load_fixture(path)
    for i, img in enumerate(fx.listed("in.image")):
        pil = Image.fromarray(img.numpy())
        fx.assert_close(f"out.msn.{i}", uint8_eval_transform(224)(pil).as_subclass(torch.Tensor))
        fx.assert_close(f"out.dinov2.{i}", uint8_eval_transform(224, interpolation="bicubic")(pil)
                        .as_subclass(torch.Tensor))


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_encoder"))
def test_ijepa_probe_features_average_pool(path):
    """I-JEPA's linear probe reads the average of the target encoder's last-layer tokens (the paper; the official
    repository has no evaluation code): our pooled features equal the official encoder's tokens averaged."""
    fx = load_fixture(path)
    model = build_ijepa_encoder(fx.config["encoder_kwargs"]).eval()
    model.load_state_dict(fx.prefixed("state."), strict=True)
    with torch.no_grad():
        fx.assert_close("out.full", model(fx.tensors["in.imgs"]))  # (the tolerance of the tokens themselves)
        pooled = model.pooled(fx.tensors["in.imgs"], pool="avg")
    atol, rtol = fx.tolerance("out.full")
    torch.testing.assert_close(pooled, fx.tensors["out.full"].mean(1), atol=atol, rtol=rtol)
