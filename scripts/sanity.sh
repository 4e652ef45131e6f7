#!/usr/bin/env bash
# Runs `ansible-test sanity` on this checkout, offline.
# ansible-test needs the tree at .../ansible_collections/kairos/kcrypt and ignores git-ignored
# files, so the tracked and untracked-but-not-ignored files are copied to a build directory.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${KCRYPT_CACHE:-$HOME/.cache/kcrypt}
PYTHON_VERSION=${SANITY_PYTHON:-3.11}
# One build directory per checkout, so runs from two worktrees never overwrite each other's tree.
dest="$CACHE/sanity/$(pwd | sha256sum | cut -c1-12)/ansible_collections/kairos/kcrypt"

pip_version=$(.venv/bin/python - <<'PY'
import re, ansible_test, pathlib
src = pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
print(re.search(r"pip='([0-9.]+)'", src.read_text()).group(1))
PY
)
mkdir -p "$HOME/.ansible/test/cache"
cp scripts/ansible_test_get_pip.py "$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"

rm -rf "$dest" && mkdir -p "$dest"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | rsync -a --from0 --files-from=- ./ "$dest/"
cd "$dest"
git init -q && git add -A  # ansible-test lists files through git when it sees a repository
# pyenv's shims need `pyenv init`; put the real interpreters on PATH for other --python versions.
extra=""
for d in "$HOME"/.pyenv/versions/3.*/bin; do [ -d "$d" ] && extra="$extra:$d"; done
export PATH="$OLDPWD/.venv/bin$extra:$PATH"
exec ansible-test sanity --venv --python "$PYTHON_VERSION" "$@"
