"""The routing defaults have one home (mora_runtime/experts/defaults.py): the pool, the trainer,
the server config and the deploy files agree with it, and reading it imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from mora_runtime.experts.defaults import ROUTING_DEFAULTS, RoutingDefaults
from mora_runtime.experts.slots import RoutingConfig
from mora_runtime.learn.trainer import CLIP_DEFAULTS, LM_DEFAULTS, LearnConfig
from serving.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]


def triple(obj: RoutingDefaults | RoutingConfig | LearnConfig) -> tuple[int, float, float]:
    return (obj.top_k, obj.tau, obj.threshold)


def test_one_entry_per_model_kind_with_the_papers_settings() -> None:
    from mora_runtime.expert_sets.format import MODEL_KINDS

    assert set(ROUTING_DEFAULTS) == set(MODEL_KINDS)
    assert triple(ROUTING_DEFAULTS["causal_lm"]) == (8, 0.03, 0.2)
    assert triple(ROUTING_DEFAULTS["clip"]) == (16, 0.01, 0.2)


def test_pool_trainer_and_server_config_read_the_defaults() -> None:
    lm, clip = ROUTING_DEFAULTS["causal_lm"], ROUTING_DEFAULTS["clip"]
    assert triple(RoutingConfig()) == triple(lm)
    assert triple(LM_DEFAULTS) == triple(lm) and triple(LM_DEFAULTS.routing) == triple(lm)
    assert triple(CLIP_DEFAULTS) == triple(clip) and triple(CLIP_DEFAULTS.routing) == triple(clip)
    cfg = ServerConfig()
    assert triple(cfg.lm.routing) == triple(lm)
    assert triple(cfg.clip.routing) == triple(clip)


def test_deploy_files_show_the_defaults() -> None:
    args = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())["applications"][0]["args"]
    for section, kind in (("lm", "causal_lm"), ("clip", "clip")):
        routing = args[section]["routing"]
        expected = ROUTING_DEFAULTS[kind]
        assert (routing["top_k"], routing["tau"], routing["threshold"]) == triple(expected)


def test_defaults_and_server_config_import_no_torch() -> None:
    code = (
        "import sys, mora_runtime.experts.defaults, serving.config, serving.http.api; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
