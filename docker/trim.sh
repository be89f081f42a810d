#!/bin/sh
# Trims an image's root file system after the toolkit's extra is installed (the Dockerfile's build
# stages run it; the final images copy what is left into one layer): what serving never reads goes.
#   - pip, setuptools and wheel (nothing is installed after this), byte code (written at first import
#     where the user may write, else compiled in memory), the test suites of the standard library and
#     of the installed packages, Python's IDE, Tk, 2to3 and ensurepip;
#   - apt's and dpkg's tools and state, perl, documentation, manuals, translations, time zones and
#     glibc's character-set converters (Python's codecs are its own);
#   - ONNX Runtime's C-API library (onnxruntime/capi/libonnxruntime.so.*, 35 MB): its Python module has the
#     runtime linked in and never loads it (it needs no libonnxruntime: readelf -d);
#   - debugging symbols in the shared libraries of the installed packages (binutils' strip, installed
#     for this and removed again where apt can reach its mirror; skipped where it cannot).
set -eu
py=python3
command -v python >/dev/null 2>&1 && py=python
site="$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
stdlib="$($py -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
if command -v apt-get >/dev/null 2>&1 && apt-get update -qq >/dev/null 2>&1 \
        && apt-get install -qq -y --no-install-recommends binutils >/dev/null 2>&1; then
    # the packages' own modules only: the libraries auditwheel vendored (*.libs/) break when stripped
    find "$site" -path '*.libs' -prune -o -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
    apt-get purge -qq -y binutils >/dev/null 2>&1 || true
    apt-get autoremove -qq -y >/dev/null 2>&1 || true
else
    echo "trim.sh: no binutils here (apt cannot reach its mirror): libraries left unstripped" >&2
fi
rm -f "$site"/onnxruntime/capi/libonnxruntime.so.*
$py -m pip uninstall -q -y pip setuptools wheel >/dev/null 2>&1 || true
rm -rf "$stdlib/test" "$stdlib/idlelib" "$stdlib/tkinter" "$stdlib/turtledemo" "$stdlib/lib2to3" "$stdlib/ensurepip" \
    "$stdlib/pydoc_data" /usr/share/python-wheels
find "$site" -mindepth 2 -maxdepth 3 -type d -name tests -prune -exec rm -rf {} +
find / -xdev -type d -name __pycache__ -prune -exec rm -rf {} +
rm -rf /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/zoneinfo /usr/share/lintian \
    /usr/lib/x86_64-linux-gnu/gconv /usr/lib/x86_64-linux-gnu/perl-base /usr/share/perl* /usr/bin/perl* \
    /var/lib/apt /var/cache/apt /var/cache/debconf /var/log/* /usr/lib/apt /usr/bin/apt* /etc/apt
