#!/usr/bin/env bash
# Celery's own unit tests with celery_tuning.install() applied to every app they create, next to the
# same tests without it: a lazy, side-effect-free install() changes no outcome. Not part of
# `./run tests` (it downloads Celery's sdist and takes ~6 minutes); run it after touching install,
# the runtime, the worker step or the settings.
#   tools/celery_own_tests.sh [pytest paths under t/unit, default: t/unit]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WORK:-$(mktemp -d)}
VERSION=$(.venv/bin/python -c 'import celery; print(celery.__version__)')
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q -e "$ROOT" pytest pytest-subtests pytest-timeout pytest-click pytest-order \
    freezegun pytest-rerunfailures msgpack pyyaml pydantic "pytest-celery>=1.3.0" "celery==$VERSION"
(cd "$WORK" && "$WORK/venv/bin/pip" download -q --no-binary :all: --no-deps "celery==$VERSION" && tar xzf "celery-$VERSION.tar.gz")
cp "$ROOT/tools/tuning_everywhere.py" "$WORK/"
cd "$WORK/celery-$VERSION"
# Suites whose optional dependencies (cloud SDKs, cryptography) are not installed here.
IGNORE=(--ignore=t/unit/backends/test_azureblockblob.py --ignore=t/unit/backends/test_dynamodb.py
        --ignore=t/unit/backends/test_gcs.py --ignore=t/unit/backends/test_mongodb.py
        --ignore=t/unit/backends/test_s3.py --ignore=t/unit/security)
PATHS=("${@:-t/unit}")
run() { "$WORK/venv/bin/python" -m pytest -p no:cacheprovider -q --timeout 60 "${IGNORE[@]}" "$@" "${PATHS[@]}" \
        2>&1 | grep -E '^FAILED|^ERROR' | sort || true; }
run > "$WORK/without.txt"
PYTHONPATH="$WORK" run -p tuning_everywhere > "$WORK/with.txt"
echo "failures without install: $(wc -l < "$WORK/without.txt"), with install on every app: $(wc -l < "$WORK/with.txt")"
if diff "$WORK/without.txt" "$WORK/with.txt"; then echo "same outcomes"; else echo "install() changed outcomes"; exit 1; fi
