"""The pre-fix variant is "unfixed"; its old name "prefix" is still accepted everywhere, with a warning."""
import argparse
import subprocess
import sys

import pytest

from kvproof.runtime.hicache.pages import HiCacheConfig
from kvproof.runtime.pd.config import PDConfig
from kvproof.spec.core import variant_arg, variant_name
from kvproof.spec.hicache_plan import hicache_plan
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.layersplit_plan import LayerSplitShape
from kvproof.spec.instance import Instance
from kvproof.verify.explore import explore

PARAMS = {"slots": 1, "writers": 1, "max_epoch": 2, "max_chunks": 1}


def test_current_names_pass_unchanged_and_silently(recwarn):
    assert variant_name("fixed") == "fixed" and variant_name("unfixed") == "unfixed"
    assert variant_arg("unfixed") == "unfixed"
    assert not recwarn.list


def test_spec_entry_points_map_prefix_to_unfixed_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'prefix' is deprecated; use 'unfixed'"):
        inst = Instance(KVSlot, "prefix", {"slots": 1, "writers": 1})
    assert inst.variant == "unfixed"
    with pytest.warns(DeprecationWarning):
        plan = hicache_plan(2, "prefix")
    assert plan == hicache_plan(2, "unfixed") and plan.name == "hicache/unfixed/L=2"
    with pytest.warns(DeprecationWarning):
        assert LayerSplitShape(2, 3, 2, "contiguous", "prefix").variant == "unfixed"


def test_the_alias_behaves_as_the_unfixed_variant():
    """Not a silent fallback to the fixed protocol: the alias finds the unfixed variant's violation."""
    with pytest.warns(DeprecationWarning):
        alias = explore(KVSlot, "prefix", PARAMS)
    unfixed, fixed = explore(KVSlot, "unfixed", PARAMS), explore(KVSlot, "fixed", PARAMS)
    assert "no_cross_request_write" in alias.violations and "no_cross_request_write" not in fixed.violations
    assert alias.graph.number_of_nodes() == unfixed.graph.number_of_nodes()


def test_runtime_configs_accept_the_alias():
    with pytest.warns(DeprecationWarning):
        assert PDConfig(variant="prefix").variant == "unfixed"
    with pytest.warns(DeprecationWarning):
        assert HiCacheConfig(variant="prefix").variant == "unfixed"
    with pytest.raises(ValueError, match="variant='bogus'"):
        PDConfig(variant="bogus")


@pytest.mark.parametrize("module,adder,flag", [
    ("kvproof.runtime.tools.stress_cli", "add_stress_args", "--protocol"),
    ("kvproof.runtime.serving.serve_cli", "add_serve_args", "--protocol"),
    ("kvproof.verify.prove", "add_prove_args", "--variant"),
    ("kvproof.verify.guards_cli", "add_explore_args", "--variant"),
])
def test_cli_accepts_prefix_and_prints_a_deprecation_message(module, adder, flag, capsys):
    import importlib
    p = argparse.ArgumentParser()
    getattr(importlib.import_module(module), adder)(p)
    value = getattr(p.parse_args([flag, "prefix"]), flag.lstrip("-"))
    assert value in ("unfixed", ["unfixed"])
    assert "'prefix' is deprecated; use 'unfixed'" in capsys.readouterr().err


def test_kvproof_explore_with_the_old_variant_name():
    r = subprocess.run([sys.executable, "-m", "kvproof", "explore", "--variant", "prefix", "--param", "writers=1",
                        "--param", "max_chunks=1"], capture_output=True, text=True, timeout=120)
    assert "kvproof: variant 'prefix' is deprecated; use 'unfixed'" in r.stderr
    assert r.returncode == 1 and r.stdout.startswith("kv_slot/unfixed ") and "no_cross_request_write" in r.stdout
