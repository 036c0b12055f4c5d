# Device-machine setup for GPU runs of vdopt with the optional FlashAttention-4 backend. Source it from the
# repository root:  source benchmarks/device_env.sh
#
# - installs every wheel carried in .whl/*.whl, .whl/fa4/*.whl, .whl/fa4/deps/*.whl into /tmp/site (no index, no
#   dependency resolution; each wheel once per machine; the FA4 wheels are built for CPython 3.12);
# - the cutlass-dsl cu13 libraries travel as two parts of one tar.xz (too large for one carry), possibly in two
#   separate calls: each part found in .whl/fa4/ is kept in /tmp/fa4parts/, and once both are there they are
#   joined, checked against their sha256 and unpacked into /tmp/site (nvidia_cutlass_dsl/ and its dist-info);
# - copies vdopt into /tmp/pkg/vdopt (the layout pyproject.toml's package-dir maps to);
# - exports PYTHONPATH=/tmp/pkg:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages (the cutlass wheel's .pth,
#   which adds dsl_packages, is not read from PYTHONPATH entries) and PYTHONSAFEPATH=1;
# and prints one line saying whether FA4 imports. Safe to source again.

_vdopt_device_env() {
    local site=/tmp/site parts=/tmp/fa4parts tarball=cutlass_dsl_libs_cu13.tar.xz
    local sha=8a7faf5effcfabf84b27b4d541f51d9ee271311299fd3e4534ff841ca8446a1e
    mkdir -p "$site/.vdopt_installed" "$parts"

    local wheel new=()
    for wheel in .whl/*.whl .whl/fa4/*.whl .whl/fa4/deps/*.whl; do
        [ -f "$wheel" ] && [ ! -e "$site/.vdopt_installed/$(basename "$wheel")" ] && new+=("$wheel")
    done
    # pip --target cannot add to a top-level folder another call already made (it skips it, or with --upgrade
    # replaces it), and the cutlass wheels and tarball all fill nvidia_cutlass_dsl/: so each call installs into
    # an empty folder that is then merged into /tmp/site. All new wheels in one call; if that fails, one call
    # each, so one bad wheel does not block the others.
    _vdopt_pip() {
        local fresh
        fresh=$(mktemp -d /tmp/vdopt_wheel.XXXXXX)
        python -m pip install -q --no-index --no-deps --target "$fresh" "$@" >/tmp/pip_vdopt.log 2>&1 \
            && cp -a "$fresh"/. "$site"/
        local status=$?
        rm -rf "$fresh"
        return $status
    }
    if [ ${#new[@]} -gt 0 ]; then
        if _vdopt_pip "${new[@]}"; then
            for wheel in "${new[@]}"; do touch "$site/.vdopt_installed/$(basename "$wheel")"; done
        else
            for wheel in "${new[@]}"; do
                if _vdopt_pip "$wheel"; then
                    touch "$site/.vdopt_installed/$(basename "$wheel")"
                else
                    echo "device_env: $(basename "$wheel") did not install: $(grep -m1 ERROR /tmp/pip_vdopt.log)" >&2
                fi
            done
        fi
    fi
    unset -f _vdopt_pip

    local part
    for part in 00 01; do
        if [ -f ".whl/fa4/$tarball.part$part" ] && ! cmp -s ".whl/fa4/$tarball.part$part" "$parts/$tarball.part$part"; then
            cp ".whl/fa4/$tarball.part$part" "$parts/"
        fi
    done
    if [ ! -e "$site/.vdopt_installed/$tarball" ] && [ -f "$parts/$tarball.part00" ] && [ -f "$parts/$tarball.part01" ]; then
        if [ "$(cat "$parts/$tarball.part00" "$parts/$tarball.part01" | sha256sum | cut -d' ' -f1)" = "$sha" ]; then
            cat "$parts/$tarball.part00" "$parts/$tarball.part01" | tar xJf - -C "$site" \
                && touch "$site/.vdopt_installed/$tarball"
        else
            echo "device_env: $parts/$tarball.part00 + part01 do not match sha256 $sha; carry both parts again" >&2
        fi
    fi

    # A fresh copy each time: a second `cp -r kernels /tmp/pkg/vdopt/kernels` would nest kernels/kernels.
    rm -rf /tmp/pkg/vdopt
    mkdir -p /tmp/pkg/vdopt && cp -r vdopt/. /tmp/pkg/vdopt/ && for d in kernels passes cost_models; do cp -r $d /tmp/pkg/vdopt/$d; done

    export PYTHONPATH=/tmp/pkg:$site:$site/nvidia_cutlass_dsl/dsl_packages
    # The repository's own vdopt/ folder lacks kernels/, passes/, cost_models/: keep `python -c` and
    # `python -m pytest` run from the repository root from importing it ahead of /tmp/pkg/vdopt.
    export PYTHONSAFEPATH=1

    local have=""
    [ -e "$site/.vdopt_installed/$tarball" ] || have=" (cutlass cu13 libraries not unpacked yet: parts in $parts: $(ls "$parts" | tr '\n' ' '))"
    python -c "
from vdopt.kernels.fa4_backend import fa4_import_error
error = fa4_import_error()
print('device_env: FA4 importable' if error is None else f'device_env: FA4 NOT importable: {error}', end='')
" 2>/tmp/vdopt_import.log || printf 'device_env: FA4 NOT importable: vdopt does not import: %s' "$(tail -1 /tmp/vdopt_import.log)"
    echo "$have"
}
_vdopt_device_env
unset -f _vdopt_device_env
