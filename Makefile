# Entry points that do all set-up themselves: `make serve` (the main job: the server on the
# embedded defaults), `make test` (the whole suite; what .ci/run runs) and `make prove` (every
# proof and refutation). Each creates (once) and reuses the local virtual environment in .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: prove test serve stress venv clean

define LINK_PYVERBS
import glob, os, sys, sysconfig
src = '/usr/lib/python3/dist-packages/pyverbs'
dst = os.path.join(sysconfig.get_paths()['purelib'], 'pyverbs')
abi = 'cpython-%d%d' % sys.version_info[:2]
if os.path.isdir(src) and glob.glob(os.path.join(src, '*' + abi + '*.so')) and not os.path.exists(dst):
    os.symlink(src, dst)
    print('linked', src, '->', dst)
endef
export LINK_PYVERBS

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this exact version is the local CPU build; a looser
	# request can make pip fetch a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# Optional RDMA extra: rdma-core's pyverbs (Debian: python3-pyverbs), when installed
	# system-wide for this Python version, is linked into the venv; nothing happens otherwise.
	$(PY) -c "$$LINK_PYVERBS"
	# SPIN, the second explicit-state engine (`kvproof explore --engine spin`): Debian's `spin`
	# package, installed when missing and apt-get is usable (root); its tests skip otherwise.
	if ! command -v spin >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin gcc) \
	      || echo "could not install spin: the SPIN engine's tests will skip"; \
	  else echo "spin not installed (needs apt-get as root): the SPIN engine's tests will skip"; fi; \
	fi
	touch $(STAMP)

venv: $(STAMP)

prove: $(STAMP)
	$(VENV)/bin/kvproof prove $(ARGS)

serve: $(STAMP)
	$(VENV)/bin/kvproof serve $(ARGS)

stress: $(STAMP)
	$(VENV)/bin/kvproof stress $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
