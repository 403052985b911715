"""Generated documentation stays in sync with the spec."""
from pathlib import Path

from kvproof.verify.docgen import PAGES, protocol_page

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_pages_are_current():
    for name, proto in PAGES.items():
        page = ROOT / "docs" / "protocols" / f"{name}.md"
        assert page.exists(), f"{page} missing: run python -m kvproof.verify.docgen"
        assert page.read_text() == protocol_page(proto), (
            f"{page} is stale: run python -m kvproof.verify.docgen")


def test_structure_map_names_every_module():
    text = (ROOT / "docs" / "structure.md").read_text()
    missing = [str(p.relative_to(ROOT)) for d in ("spec", "verify", "runtime", "kernels", "kvproof")
               for p in sorted((ROOT / d).rglob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in text]
    assert not missing, f"docs/structure.md lacks: {missing}"
