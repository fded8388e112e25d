"""The trainer on tiny models: only the new experts learn, sets round-trip, seeds reproduce."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.expert_sets.store import load_expert_set, save_expert_set
from mora_runtime.experts.backends.trainable import installed
from mora_runtime.experts.patching import find_target_modules, patch_model
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.learn import learn_task
from mora_runtime.learn.data import ImageDataset, LMExample, write_image_folder, write_lm_jsonl
from mora_runtime.learn.domains import domain_names, get_domain
from mora_runtime.learn.harness_clip import ClipHarness
from mora_runtime.learn.learn_task import learn_clip, learn_from_files, learn_lm
from mora_runtime.learn.lora_baseline import LoRA
from mora_runtime.learn.objectives import LMObjective, collate, tokenize_examples
from mora_runtime.learn.suites_clip import task_data
from mora_runtime.learn.trainer import (
    LearnConfig,
    add_to_pool,
    cosine_factor,
    init_experts,
    learn_experts,
    load_pool_sets,
)
from mora_runtime.models.clip import DEFAULT_TEMPLATE, ClipClassifier
from mora_runtime.models.clip_loading import load_clip
from mora_runtime.models.lm import load_causal_lm

CFG = LearnConfig(rank=4, top_k=4, tau=0.1, threshold=0.1, steps=4, lr=1e-2, batch_size=2)
EXAMPLES = [
    LMExample("the quick brown", " fox"),
    LMExample("hello", " world"),
    LMExample("what is the capital of france?", " paris"),
    LMExample("", "every expert scores itself"),
]


@pytest.fixture
def lm(tiny_llama_dir):
    loaded = load_causal_lm(tiny_llama_dir, device="cpu", dtype=torch.float32)
    loaded.model.requires_grad_(False)
    return loaded


def pool_buffers(pool: ExpertPool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    n = pool.num_slots
    return {p: (l.A[:n].clone(), l.B[:n].clone()) for p, l in pool.layers.items()}


def random_set(pool: ExpertPool, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        p: (
            torch.randn(rank, l.in_features, generator=g),
            torch.randn(rank, l.out_features, generator=g),
        )
        for p, l in pool.layers.items()
    }


# --- pieces ----------------------------------------------------------------------------------


def test_init_is_kaiming_uniform_keys_and_zero_values() -> None:
    experts = init_experts({"a": (64, 32), "b": (16, 8)}, 5, torch.Generator().manual_seed(0))
    for (d, _), (A, B) in zip([(64, 32), (16, 8)], experts.values(), strict=True):
        # kaiming_uniform with a = sqrt(5) on [r, D]: bound = 1 / sqrt(D), as nn.Linear.
        assert A.shape[0] == 5 and A.abs().max() <= 1 / math.sqrt(d)
        assert A.std() > 0.3 / math.sqrt(d)
        assert torch.equal(B, torch.zeros_like(B)) and A.requires_grad and B.requires_grad
    again = init_experts({"b": (16, 8), "a": (64, 32)}, 5, torch.Generator().manual_seed(0))
    assert all(torch.equal(experts[p][0], again[p][0]) for p in experts)


def test_cosine_schedule_has_no_warmup() -> None:
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(99, 100) == pytest.approx(0.0, abs=1e-3)


def test_completion_only_labels(tiny_tokenizer) -> None:
    batch = tokenize_examples(tiny_tokenizer, EXAMPLES[:2], eos_token_id=2, max_length=64)
    _, mask, labels = collate(batch, pad_id=0)
    for row, example in enumerate(batch):
        labelled = labels[row][labels[row] != -100].tolist()
        assert labelled == list(example.ids[example.start :]) and labelled[-1] == 2
        assert mask[row].sum() == len(example.ids)
    truncated = tokenize_examples(tiny_tokenizer, EXAMPLES[2:3], eos_token_id=2, max_length=4)
    assert len(truncated[0].ids) == 4  # the start of the prompt goes, the completion stays


# --- learning beside a frozen pool ------------------------------------------------------------


def test_only_new_experts_change_and_old_sets_stay_bit_identical(lm) -> None:
    pool = patch_model(lm.model, routing=CFG.routing)
    pool.add_set("old", random_set(pool, 3, seed=1))
    before_pool = pool_buffers(pool)
    before_base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    objective = LMObjective(lm.model, lm.tokenizer, EXAMPLES, eos_token_id=2, batch_size=2, seed=0)
    experts, log = learn_experts(pool, objective, CFG, progress=False)

    assert installed(pool) is None and [e.name for e in pool.sets()] == ["old"]
    for path, (A, B) in pool_buffers(pool).items():
        assert torch.equal(A, before_pool[path][0]) and torch.equal(B, before_pool[path][1])
    after_base = lm.model.state_dict()
    assert all(torch.equal(after_base[k], v) for k, v in before_base.items())
    init = init_experts(
        {p: (l.in_features, l.out_features) for p, l in pool.layers.items()},
        4,
        torch.Generator().manual_seed(CFG.seed),
    )
    assert set(experts) == set(pool.layers)
    assert any(not torch.equal(experts[p][0], init[p][0]) for p in experts)  # keys learned
    assert all(B.abs().sum() > 0 for _, B in experts.values())  # values left zero
    assert log.steps == 4 and len(log.losses) == 4 and all(math.isfinite(v) for v in log.losses)


def test_fixed_seed_reproduces_and_another_seed_differs(lm) -> None:
    pool = patch_model(lm.model, routing=CFG.routing)

    def run(seed: int):
        objective = LMObjective(
            lm.model, lm.tokenizer, EXAMPLES, eos_token_id=2, batch_size=2, seed=seed
        )
        return learn_experts(pool, objective, CFG.with_overrides(seed=seed), progress=False)

    (first, log1), (second, log2), (other, _) = run(0), run(0), run(1)
    assert log1.losses == log2.losses
    assert all(torch.equal(first[p][i], second[p][i]) for p in first for i in (0, 1))
    assert any(not torch.equal(first[p][0], other[p][0]) for p in first)


def test_written_set_loads_with_the_right_fingerprint(lm, tmp_path) -> None:
    pool = patch_model(lm.model, routing=CFG.routing)
    expert_set = learn_lm(lm, pool, EXAMPLES, CFG, name="tiny-task", progress=False)
    directory = save_expert_set(expert_set, tmp_path / "tiny-task")
    fresh = load_causal_lm(lm.model_dir, device="cpu", dtype=torch.float32).model  # unpatched
    modules = find_target_modules(fresh)
    loaded = load_expert_set(
        directory, expected_fingerprint=base_fingerprint(fresh, modules), expected_kind="causal_lm"
    )
    meta = loaded.meta
    assert (meta.rank, meta.top_k, meta.tau, meta.threshold, meta.scale) == (4, 4, 0.1, 0.1, 1.0)
    assert set(meta.target_modules) == set(modules)
    training = meta.training
    assert training["steps"] == 4 and training["data_hash"].startswith("sha256:")
    assert len(training["loss_curve"]) == 4 and training["seconds"] >= 0
    for path, (A, B) in expert_set.tensors.items():
        assert torch.equal(loaded.tensors[path][0], A) and torch.equal(loaded.tensors[path][1], B)
    # Loaded back into a pool, the set serves; a second task learns beside it.
    pool2 = patch_model(fresh, routing=CFG.routing)
    assert [s.name for s in load_pool_sets(fresh, pool2, [directory], "causal_lm")] == ["tiny-task"]


def test_learn_from_files_end_to_end_and_pool_stays_frozen(tiny_llama_dir, tmp_path) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", EXAMPLES)
    first = learn_from_files(
        "lm",
        data,
        "first",
        tmp_path / "store" / "first",
        base=tiny_llama_dir,
        cfg=CFG,
        progress=False,
    )
    second = learn_from_files(
        "lm",
        data,
        "second",
        tmp_path / "store" / "second",
        base=tiny_llama_dir,
        pool_dirs=[first.path],
        cfg=CFG.with_overrides(seed=3),
        progress=False,
    )
    assert second.expert_set.meta.training["pool"] == ["first"]
    reread = load_expert_set(first.path)  # the earlier set on disk is untouched
    for path, (A, B) in first.expert_set.tensors.items():
        assert torch.equal(reread.tensors[path][0], A) and torch.equal(reread.tensors[path][1], B)
    with pytest.raises(FileExistsError):
        learn_from_files("lm", data, "first", first.path, base=tiny_llama_dir, cfg=CFG)


def test_interrupted_learning_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", EXAMPLES)
    calls = []

    def interrupt(self, step):
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    original = LMObjective.__call__
    monkeypatch.setattr(LMObjective, "__call__", interrupt)
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        learn_from_files(
            "lm", data, "cut", store / "cut", base=tiny_llama_dir, cfg=CFG, progress=False
        )
    assert calls == [0, 1, 2]
    assert not store.exists() or not any(store.iterdir())


def test_interrupted_save_leaves_no_half_written_set(lm, tmp_path, monkeypatch) -> None:
    pool = patch_model(lm.model, routing=CFG.routing)
    expert_set = learn_lm(lm, pool, EXAMPLES, CFG.with_overrides(steps=1), name="s", progress=False)
    import mora_runtime.expert_sets.store as store

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_write_metadata", boom)
    with pytest.raises(KeyboardInterrupt):
        save_expert_set(expert_set, tmp_path / "store" / "s")
    assert list((tmp_path / "store").iterdir()) == []


# --- CLIP -------------------------------------------------------------------------------------


def test_clip_task_learns_new_experts_only(tiny_clip_dir, tmp_path) -> None:
    classifier = ClipClassifier(load_clip(tiny_clip_dir, device="cpu"))
    cfg = LearnConfig(rank=4, top_k=4, tau=0.05, threshold=0.2, steps=3, lr=1e-2, batch_size=8)
    pool = classifier.patch(cfg.routing)
    data = task_data("shapes", "train", per_class=2)
    first = learn_clip(classifier, data, cfg, name="shapes", progress=False)
    add_to_pool(pool, first)
    before_pool = pool_buffers(pool)
    second = learn_clip(
        classifier, task_data("glyphs", "train", per_class=2), cfg, name="glyphs", progress=False
    )
    for path, (A, B) in pool_buffers(pool).items():
        assert torch.equal(A, before_pool[path][0]) and torch.equal(B, before_pool[path][1])
    assert first.meta.class_names == data.class_names and first.meta.model_kind == "clip"
    assert second.meta.training["pool"] == ["shapes"]
    # Each set carries its domain's template and trained with exactly the domain's prompts.
    for expert_set, domain in ((first, get_domain("shapes")), (second, get_domain("glyphs"))):
        assert expert_set.meta.prompt_template == domain.prompt_template
        assert expert_set.meta.training["prompts"] == domain.prompts()
    directory = save_expert_set(second, tmp_path / "glyphs")
    model = classifier.clip.model
    modules = find_target_modules(model)
    loaded = load_expert_set(
        directory, expected_fingerprint=base_fingerprint(model, modules), expected_kind="clip"
    )
    assert loaded.meta.class_names == second.meta.class_names
    assert loaded.meta.prompt_template == second.meta.prompt_template


def test_clip_learn_from_image_folder(tiny_clip_dir, tmp_path) -> None:
    folder = write_image_folder(tmp_path / "shapes", task_data("shapes", "train", per_class=2))
    cfg = learn_task.CLIP_DEFAULTS.with_overrides(rank=2, top_k=2, steps=2, batch_size=4)
    result = learn_from_files(
        "clip", folder, "shapes", tmp_path / "out", base=tiny_clip_dir, cfg=cfg, progress=False
    )
    meta = json.loads((result.path / "expert_set.json").read_text())
    assert sorted(meta["class_names"]) == sorted(
        task_data("shapes", "test", per_class=1).class_names
    )
    assert meta["training"]["images"] == 12 and meta["rank"] == 2
    # An exported suite task is recognised by its class names: its domain's template.
    assert meta["format_version"] == 2
    assert meta["prompt_template"] == get_domain("shapes").prompt_template


def test_clip_harness_prompts_every_domain_with_its_template(tiny_clip_dir) -> None:
    # The continual-learning results depend on these prompts: each domain's own template,
    # for every method and before a task is learned (its set is not loaded yet).
    harness = ClipHarness(
        ["shapes", "glyphs"], CFG, model_dir=tiny_clip_dir, train_per_class=1, test_per_class=1
    )
    for name in domain_names():
        domain = get_domain(name)
        for classifier in (harness.mora, harness.base):
            assert list(classifier.prompts(domain.class_names)) == domain.prompts()


def test_task_template() -> None:
    shapes, glyphs = get_domain("shapes"), get_domain("glyphs")
    assert learn_task.task_template(shapes.class_names) == shapes.prompt_template
    assert learn_task.task_template(["circle", "letter B"]) == DEFAULT_TEMPLATE  # two domains
    assert learn_task.task_template(["circle", "blob"]) == DEFAULT_TEMPLATE
    assert learn_task.task_template(glyphs.class_names, "a {} in ink") == "a {} in ink"
    with pytest.raises(ValueError, match="exactly one"):
        learn_task.task_template(["blob"], "no slot")


def test_user_clip_task_carries_the_default_or_its_own_template(tiny_clip_dir, tmp_path) -> None:
    shapes = task_data("shapes", "train", per_class=2)
    data = ImageDataset(("left blob", "right blob"), shapes.images[:4], (0, 1, 0, 1))
    folder = write_image_folder(tmp_path / "blobs", data)
    cfg = learn_task.CLIP_DEFAULTS.with_overrides(rank=2, top_k=2, steps=1, batch_size=4)
    run = dict(base=tiny_clip_dir, cfg=cfg, progress=False)
    plain = learn_from_files("clip", folder, "blobs", tmp_path / "a", **run).expert_set.meta
    assert plain.prompt_template == DEFAULT_TEMPLATE
    assert plain.training["prompts"] == ["a photo of left blob", "a photo of right blob"]
    own = learn_from_files(
        "clip", folder, "blobs", tmp_path / "b", prompt_template="a {} on paper", **run
    ).expert_set.meta
    assert own.prompt_template == "a {} on paper"
    assert own.training["prompts"] == ["a left blob on paper", "a right blob on paper"]
    # Refused before any model loads or anything is written.
    with pytest.raises(ValueError, match="exactly one"):
        learn_from_files("clip", folder, "blobs", tmp_path / "c", prompt_template="x", **run)
    with pytest.raises(ValueError, match="CLIP"):
        learn_from_files("lm", folder, "blobs", tmp_path / "d", prompt_template="a {}", **run)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# --- LoRA baseline ---------------------------------------------------------------------------


def test_lora_starts_as_the_base_and_only_it_learns(lm) -> None:
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lm.model(ids).logits
    modules = find_target_modules(lm.model)
    lora = LoRA(lm.model, modules, rank=4, seed=0)
    assert lora.num_parameters() == sum(4 * (d + o) for d, o in modules.values())
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, base)  # B = 0: exactly the base
    with torch.no_grad():
        for _, B in lora.params.values():
            B.normal_()
        changed = lm.model(ids).logits
        with lora.disabled():
            assert torch.equal(lm.model(ids).logits, base)
    assert not torch.allclose(changed, base)
    lm.model(ids).logits.square().mean().backward()
    assert all(p.grad is not None for p in lora.parameters())
    assert all(p.grad is None for p in lm.model.parameters())
    state = lora.state()
    lora.reset(seed=0)
    assert all(torch.equal(B, torch.zeros_like(B)) for _, B in lora.params.values())
    lora.load_state(state)
    assert all(torch.equal(lora.params[p][1], state[p][1]) for p in state)


def test_thread_budget_sets_and_restores() -> None:
    from mora_runtime.learn.trainer import auto_threads, thread_budget

    before = torch.get_num_threads()
    with thread_budget(1) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert 1 <= auto_threads() <= before
