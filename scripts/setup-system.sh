#!/usr/bin/env bash
# The system packages fedit's tests need, on Debian (12 or 13): Chromium drives the web-chat
# test headless; openssl and ssh-keygen make the TLS certificates and SuperNode keys of the
# Flower deployment tests; iproute2 puts each party of the deployment test in its own network namespace
# (as root). Installs only what is missing; uses sudo when not root.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v openssl >/dev/null || need+=(openssl)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
  echo "system packages: chromium, openssl, ssh-keygen and ip are present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "system packages: installed ${need[*]}"
