"""`kvproof bench eviction --quick`: a device pool under 25% of the working set stays correct and leak-free."""
import pytest

from kvproof.runtime.tools.eviction_bench import agent_workload, bench_eviction


def test_agent_workload_revisits_each_prefix_once_per_round():
    prompts = agent_workload(docs=3, rounds=2, doc_len=20)
    assert len(prompts) == 6 and len({tuple(p[:20]) for p in prompts}) == 3


@pytest.mark.timeout(120)
def test_quick_eviction_run_has_no_corruption_and_no_leak():
    doc = bench_eviction(quick=True)
    run = doc["eviction"]
    assert run["pool_fraction_of_working_set"] < 0.25
    assert run["corrupted_outputs"] == 0 and run["leaked_pages"] == 0 and run["pinned_host_pages"] == 0
    assert run["spec_problems"] == []
    assert run["evictions"] > run["device_pages"] and run["swap_ins"] > 0 and run["aborted"] > 0
    assert 0 < run["hit_rate"] < 1 and run["page_ops"] > 0 and run["us_per_page_op_in_engine"] > 0
    assert doc["us_per_page_op_fast_path"] > 0
