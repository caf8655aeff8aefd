#!/usr/bin/env bash
# Install the system packages a virtual display needs for the GUI tests (Xvfb, Mesa GL, Qt's xcb
# libraries) when they are missing. Uses apt-get as root, sudo when available, else says what to do.
set -euo pipefail

PKGS=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 libdbus-1-3
    libfontconfig1 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
    libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libxcb-xkb1)

if ! command -v dpkg-query >/dev/null 2>&1; then
    if command -v xvfb-run >/dev/null 2>&1; then
        exit 0
    fi
    echo "sysdeps: error: xvfb-run not found and this is not a Debian/Ubuntu system; install Xvfb, Mesa GL and Qt's xcb libraries with your package manager" >&2
    exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "sysdeps: error: missing system packages: ${missing[*]} (install them: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "sysdeps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >/dev/null
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
