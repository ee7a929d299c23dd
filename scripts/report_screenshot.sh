#!/usr/bin/env bash
# A headless-Chromium screenshot of an HTML report (src/eval/html.rs), to look at a page without a
# desktop. Installs Debian's chromium when it is missing (apt-get, with sudo when not root).
#
#   bash scripts/report_screenshot.sh report.html shot.png [FRAGMENT]
#
# FRAGMENT presets the page's filters, e.g. 'result=wrong' or 'level=L1&label=anomalous'.
# SIZE (default 1400,2000) is the window, width,height in pixels.
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 HTML PNG [FRAGMENT]" >&2
  exit 2
fi
html=$1 png=$2 fragment=${3:-}
[ -f "$html" ] || { echo "no such file: $html" >&2; exit 2; }
browser=""
for b in chromium chromium-browser; do
  command -v "$b" >/dev/null && { browser=$b; break; }
done
if [ -z "$browser" ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends chromium
  browser=chromium
fi
abs_html=$(realpath "$html")
mkdir -p "$(dirname "$png")"
abs_png=$(realpath -m "$png")
rm -f "$abs_png"
url="file://$abs_html${fragment:+#$fragment}"
# Chromium talks on stderr even when it works; keep it for a failure.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${SIZE:-1400,2000}" \
  --screenshot="$abs_png" "$url" >"$log" 2>&1 || [ ! -s "$abs_png" ]; then
  cat "$log" >&2
  echo "screenshot failed: $url" >&2
  exit 1
fi
echo "$abs_png"
