"""The distillation losses against their formulas, computed here by hand with Python floats and loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vkd.distill.losses import (
    KD_LOSS_TYPES,
    ContrastiveLoss,
    DistillationLoss,
    FeatureMSELoss,
    ICLLoss,
    KLDivergenceLoss,
    SimilarityMSELoss,
    TeacherOutput,
    gather_with_local_grad,
    teacher_targets,
)


def unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


# ---- plain-Python reference maths -------------------------------------------------------------

def matmul_t(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """a @ bᵀ."""
    return [[sum(x * y for x, y in zip(ra, rb, strict=True)) for rb in b] for ra in a]


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


def scaled(m: list[list[float]], factor: float) -> list[list[float]]:
    return [[v * factor for v in row] for row in m]


def kept(i: int, n: int, ids: list[int] | None) -> list[int]:
    """Columns row i competes over: all but other pairs showing the same image."""
    return [j for j in range(n) if ids is None or j == i or ids[j] != ids[i]]


def softmax_rows(m: list[list[float]], ids: list[int] | None = None) -> list[list[float]]:
    out = []
    for i, row in enumerate(m):
        cols = kept(i, len(row), ids)
        z = sum(math.exp(row[j]) for j in cols)
        out.append([math.exp(row[j]) / z if j in cols else 0.0 for j in range(len(row))])
    return out


def infonce(logits: list[list[float]], ids: list[int] | None = None) -> float:
    """mean_i −log softmax(row i)[i]."""
    return sum(-math.log(softmax_rows(logits, ids)[i][i]) for i in range(len(logits))) / len(logits)


def kl_batchmean(p: list[list[float]], q: list[list[float]]) -> float:
    """(1/n) Σ_i Σ_j p_ij (log p_ij − log q_ij), skipping p_ij = 0."""
    return sum(pij * (math.log(pij) - math.log(qij)) for prow, qrow in zip(p, q, strict=True)
               for pij, qij in zip(prow, qrow, strict=True) if pij > 0) / len(p)


def normalise(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def project(rows: list[list[float]], weight: list[list[float]]) -> list[list[float]]:
    """normalise(W x) per row, W of shape [d_out, d_in]."""
    return [normalise([sum(w * x for w, x in zip(wrow, r, strict=True)) for wrow in weight]) for r in rows]


def assert_close(actual: torch.Tensor, expected: float, tol: float = 1e-9) -> None:
    assert actual.item() == pytest.approx(expected, rel=tol, abs=tol)


# ---- CE ----------------------------------------------------------------------------------------

def test_contrastive_is_symmetric_infonce() -> None:
    text, image = unit(4, 3, 0), unit(4, 3, 1)
    logits = scaled(matmul_t(text.tolist(), image.tolist()), 7.0)
    expected = (infonce(logits) + infonce(transpose(logits))) / 2
    assert_close(ContrastiveLoss()(text, image, 7.0), expected)
    assert_close(ContrastiveLoss()(text, image, torch.tensor(7.0, dtype=torch.float64)), expected)
    # the image→text half really is there: swapping the modalities keeps the value
    assert_close(ContrastiveLoss()(image, text, 7.0), expected)


def test_contrastive_does_not_treat_captions_of_one_image_as_negatives() -> None:
    text, image = unit(5, 3, 2), unit(5, 3, 3)
    ids = [7, 7, 1, 2, 7]  # pairs 0, 1 and 4 show the same image
    logits = scaled(matmul_t(text.tolist(), image.tolist()), 10.0)
    expected = (infonce(logits, ids) + infonce(transpose(logits), ids)) / 2
    masked = ContrastiveLoss()(text, image, 10.0, image_ids=torch.tensor(ids))
    assert_close(masked, expected)
    assert masked.item() != pytest.approx((infonce(logits) + infonce(transpose(logits))) / 2, rel=1e-3)
    # all ids distinct: nothing is masked
    assert_close(ContrastiveLoss()(text, image, 10.0, image_ids=torch.arange(5)),
                 (infonce(logits) + infonce(transpose(logits))) / 2)


# ---- teacher ensemble and KL -------------------------------------------------------------------

def two_teachers(n: int) -> list[TeacherOutput]:
    """Teachers of different dimensions (5 and 7), scales and weights."""
    return [TeacherOutput(unit(n, 5, 10), unit(n, 5, 11), logit_scale=20.0, weight=3.0),
            TeacherOutput(unit(n, 7, 12), unit(n, 7, 13), logit_scale=torch.tensor(1 / 0.05), weight=1.0)]


def hand_targets(teachers: list[TeacherOutput], temperature: float,
                 ids: list[int] | None = None) -> tuple[list[list[float]], list[list[float]]]:
    total_weight = sum(t.weight for t in teachers)
    n = teachers[0].text.shape[0]
    rows = [[0.0] * n for _ in range(n)]
    cols = [[0.0] * n for _ in range(n)]
    for t in teachers:
        logits = scaled(matmul_t(t.text.tolist(), t.image.tolist()), float(t.logit_scale) / temperature)
        for acc, probs in ((rows, softmax_rows(logits, ids)), (cols, softmax_rows(transpose(logits), ids))):
            for i in range(n):
                for j in range(n):
                    acc[i][j] += t.weight / total_weight * probs[i][j]
    return rows, cols


def test_teacher_targets_average_softmaxed_matrices_of_teachers_of_different_dims() -> None:
    teachers = two_teachers(4)
    p_rows, p_cols = teacher_targets(teachers, temperature=2.0)
    want_rows, want_cols = hand_targets(teachers, 2.0)
    torch.testing.assert_close(p_rows, torch.tensor(want_rows, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_cols, torch.tensor(want_cols, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_rows.sum(1), torch.ones(4, dtype=p_rows.dtype))
    # the weights matter: equal weights give a different ensemble
    equal = [TeacherOutput(t.text, t.image, t.logit_scale) for t in teachers]
    assert not torch.allclose(teacher_targets(equal, 2.0)[0], p_rows)


def test_kl_divergence_is_t_squared_kl_teacher_to_student_both_directions() -> None:
    n, temperature, scale = 4, 2.0, 10.0
    text, image, teachers = unit(n, 3, 0), unit(n, 3, 1), two_teachers(n)
    p_rows, p_cols = hand_targets(teachers, temperature)
    student = scaled(matmul_t(text.tolist(), image.tolist()), scale / temperature)
    q_rows, q_cols = softmax_rows(student), softmax_rows(transpose(student))
    expected = temperature**2 * (kl_batchmean(p_rows, q_rows) + kl_batchmean(p_cols, q_cols)) / 2
    actual = KLDivergenceLoss(temperature)(text, image, scale, teachers)
    assert_close(actual, expected)
    # the direction matters: KL(student ‖ teacher) is a different number
    reversed_kl = temperature**2 * (kl_batchmean(q_rows, p_rows) + kl_batchmean(q_cols, p_cols)) / 2
    assert actual.item() != pytest.approx(reversed_kl, rel=1e-3)


def test_kl_divergence_drops_captions_of_the_same_image_from_both_distributions() -> None:
    n, temperature, scale = 5, 1.5, 8.0
    ids = [0, 0, 1, 2, 1]
    text = unit(n, 3, 4).requires_grad_()
    image, teachers = unit(n, 3, 5), two_teachers(n)
    p_rows, p_cols = hand_targets(teachers, temperature, ids)
    student = scaled(matmul_t(text.tolist(), image.tolist()), scale / temperature)
    q_rows, q_cols = softmax_rows(student, ids), softmax_rows(transpose(student), ids)
    expected = temperature**2 * (kl_batchmean(p_rows, q_rows) + kl_batchmean(p_cols, q_cols)) / 2
    actual = KLDivergenceLoss(temperature)(text, image, scale, teachers, image_ids=torch.tensor(ids))
    assert_close(actual, expected)
    actual.backward()  # masked entries (−inf logits) must not poison the gradient
    assert torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0


# ---- feature MSE, ICL, similarity MSE ----------------------------------------------------------

def test_feature_mse_projects_the_student_into_each_teacher_space() -> None:
    n = 4
    text, image = unit(n, 3, 0, torch.float32), unit(n, 3, 1, torch.float32)
    teachers = [TeacherOutput(unit(n, 5, 2, torch.float32), unit(n, 5, 3, torch.float32), 20.0, weight=1.0),
                TeacherOutput(unit(n, 3, 4, torch.float32), unit(n, 3, 5, torch.float32), 20.0, weight=3.0)]
    loss = FeatureMSELoss(student_dim=3, teacher_dims=[5, 3])
    # a learned 3→5 map for the first teacher, the identity (no parameters) for the same-size one
    assert [tuple(p.shape) for p in loss.parameters()] == [(5, 3)]
    weight = torch.arange(15, dtype=torch.float32).reshape(5, 3).sin()
    with torch.no_grad():
        loss.projections.maps[0].weight.copy_(weight)

    def sq_dist(a: list[list[float]], b: list[list[float]]) -> float:
        return sum(sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) for ra, rb in zip(a, b, strict=True)) / len(a)

    w = weight.tolist()
    first = (sq_dist(project(text.tolist(), w), teachers[0].text.tolist())
             + sq_dist(project(image.tolist(), w), teachers[0].image.tolist())) / 2
    second = (sq_dist(text.tolist(), teachers[1].text.tolist())
              + sq_dist(image.tolist(), teachers[1].image.tolist())) / 2
    assert_close(loss(text, image, teachers), 0.25 * first + 0.75 * second, tol=1e-5)


def test_icl_pairs_student_image_with_teacher_text_and_student_text_with_teacher_image() -> None:
    n, scale = 4, 12.0
    ids = [3, 1, 3, 2]
    text, image = unit(n, 4, 0, torch.float32), unit(n, 4, 1, torch.float32)
    teachers = [TeacherOutput(unit(n, 4, 2, torch.float32), unit(n, 4, 3, torch.float32), 50.0, weight=1.0),
                TeacherOutput(unit(n, 6, 4, torch.float32), unit(n, 6, 5, torch.float32), 50.0, weight=1.0)]
    loss = ICLLoss(student_dim=4, teacher_dims=[4, 6])
    weight = torch.arange(24, dtype=torch.float32).reshape(6, 4).cos()
    with torch.no_grad():
        loss.projections.maps[1].weight.copy_(weight)

    def icl(s_text: list[list[float]], s_image: list[list[float]], t: TeacherOutput) -> float:
        text_to_image = infonce(scaled(matmul_t(s_text, t.image.tolist()), scale), ids)
        image_to_text = infonce(scaled(matmul_t(s_image, t.text.tolist()), scale), ids)
        return (text_to_image + image_to_text) / 2

    w = weight.tolist()
    expected = (icl(text.tolist(), image.tolist(), teachers[0])
                + icl(project(text.tolist(), w), project(image.tolist(), w), teachers[1])) / 2
    assert_close(loss(text, image, scale, teachers, image_ids=torch.tensor(ids)), expected, tol=1e-5)


def test_similarity_mse_compares_cosine_similarity_matrices() -> None:
    n = 3
    text, image, teachers = unit(n, 3, 0), unit(n, 3, 1), two_teachers(n)
    student = matmul_t(text.tolist(), image.tolist())

    def mse(t: TeacherOutput) -> float:
        target = matmul_t(t.text.tolist(), t.image.tolist())
        return sum((student[i][j] - target[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2

    assert_close(SimilarityMSELoss()(text, image, teachers), 0.75 * mse(teachers[0]) + 0.25 * mse(teachers[1]))


# ---- the combined loss -------------------------------------------------------------------------

def make_loss(**overrides: object) -> DistillationLoss:
    kwargs = dict(kd_types=KD_LOSS_TYPES, distillation_weight=0.3, temperature=2.0, use_distillation=True,
                  student_dim=3, teacher_dims=(5, 7))
    kwargs.update(overrides)
    return DistillationLoss(**kwargs)


def test_total_is_one_minus_w_ce_plus_w_sum_of_kd_terms() -> None:
    n = 4
    text, image, teachers = unit(n, 3, 0, torch.float32), unit(n, 3, 1, torch.float32), two_teachers(n)
    loss = make_loss()
    out = loss(text, image, 10.0, teachers)
    assert set(out.parts) == {"ce", *KD_LOSS_TYPES}
    logits = scaled(matmul_t(text.tolist(), image.tolist()), 10.0)
    assert_close(out.parts["ce"], (infonce(logits) + infonce(transpose(logits))) / 2, tol=1e-5)
    assert_close(out.parts["kl_divergence"], KLDivergenceLoss(2.0)(text, image, 10.0, teachers).item(), tol=1e-6)
    kd_sum = sum(out.parts[k].item() for k in KD_LOSS_TYPES)
    assert_close(out.total, 0.7 * out.parts["ce"].item() + 0.3 * kd_sum, tol=1e-6)
    # the weight is mutable and takes effect
    loss.distillation_weight = 1.0
    assert_close(loss(text, image, 10.0, teachers).total, kd_sum, tol=1e-6)


def test_use_distillation_off_is_ce_alone_and_needs_no_teacher() -> None:
    text, image = unit(4, 3, 0, torch.float32), unit(4, 3, 1, torch.float32)
    loss = make_loss(use_distillation=False, teacher_dims=())
    assert list(loss.parameters()) == []
    logits = scaled(matmul_t(text.tolist(), image.tolist()), 5.0)
    expected = (infonce(logits) + infonce(transpose(logits))) / 2
    alone = loss(text, image, 5.0, [])
    assert set(alone.parts) == {"ce"}
    assert_close(alone.total, expected, tol=1e-5)
    assert_close(loss(text, image, 5.0, two_teachers(4)).total, expected, tol=1e-5)  # teachers ignored


def test_gradients_reach_the_student_and_projections_but_not_the_teachers() -> None:
    n = 4
    text = unit(n, 3, 0, torch.float32).requires_grad_()
    image = unit(n, 3, 1, torch.float32).requires_grad_()
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    teachers = [TeacherOutput(t.text.float().requires_grad_(), t.image.float().requires_grad_(),
                              torch.tensor(20.0, requires_grad=True), t.weight) for t in two_teachers(n)]
    loss = make_loss()
    loss(text, image, log_scale.exp(), teachers, image_ids=torch.tensor([0, 1, 0, 2])).total.backward()
    for student in (text, image, log_scale, *loss.parameters()):
        assert student.grad is not None and student.grad.abs().sum() > 0
    for t in teachers:
        assert t.text.grad is None and t.image.grad is None and t.logit_scale.grad is None


def test_temperature_is_mutable_and_reaches_the_kl_term() -> None:
    text, image, teachers = unit(4, 3, 0, torch.float32), unit(4, 3, 1, torch.float32), two_teachers(4)
    loss = make_loss(kd_types=["kl_divergence"])
    loss.temperature = 4.0
    assert loss.kd["kl_divergence"].temperature == 4.0
    assert_close(loss(text, image, 10.0, teachers).parts["kl_divergence"],
                 KLDivergenceLoss(4.0)(text, image, 10.0, teachers).item(), tol=1e-6)


def test_feature_mse_and_icl_share_one_projection_per_teacher() -> None:
    loss = make_loss(kd_types=["feature_mse", "icl"])
    assert loss.kd["feature_mse"].projections is loss.kd["icl"].projections
    assert [tuple(p.shape) for p in loss.parameters()] == [(5, 3), (7, 3)]


def test_bad_settings_and_inputs_name_what_would_be_accepted() -> None:
    with pytest.raises(ValueError, match="accepted are kl_divergence, feature_mse, icl, similarity_mse"):
        make_loss(kd_types=["kl", "feature_mse"])
    with pytest.raises(ValueError, match="kd_types is empty"):
        make_loss(kd_types=[])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_loss(distillation_weight=1.5)
    text, image = unit(4, 3, 0, torch.float32), unit(4, 3, 1, torch.float32)
    with pytest.raises(ValueError, match="teacher_dims"):
        make_loss(kd_types=["feature_mse"])(text, image, 10.0, two_teachers(4)[::-1])
    with pytest.raises(ValueError, match="same \\(gathered\\) batch"):
        make_loss(kd_types=["similarity_mse"])(text, image, 10.0, two_teachers(3))
    with pytest.raises(ValueError, match="at least one TeacherOutput"):
        make_loss()(text, image, 10.0, [])


# ---- gathering ---------------------------------------------------------------------------------

def test_gather_is_the_identity_in_a_single_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    gathered = gather_with_local_grad(x)
    torch.testing.assert_close(gathered, x)
    (gathered * torch.arange(6.0).reshape(3, 2)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(6.0).reshape(3, 2))


def _gather_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # uneven row counts (2 and 3), values that say which rank they came from
        x = torch.full((rank + 2, 2), float(rank + 1), requires_grad=True)
        gathered = gather_with_local_grad(x)
        expected = torch.cat([torch.full((r + 2, 2), float(r + 1)) for r in range(world)])
        torch.testing.assert_close(gathered.detach(), expected)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
        (gathered * weights).sum().backward()
        start = sum(r + 2 for r in range(rank))
        torch.testing.assert_close(x.grad, weights[start : start + rank + 2])  # its own slice only
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_across_two_processes_keeps_only_the_local_gradient(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
