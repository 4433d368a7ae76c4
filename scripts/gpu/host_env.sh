# Sourced by scripts/gpu/device.sh and scripts/gpu/followup.sh on the GPU host (with `root`
# set to the repository root): the binaries and the libraries they need.
#   bin        the folder of the binaries (gpu-bin, or DOTS_MOE_GPU_BIN; unpacked into a
#              temporary folder when build.sh packed them)
#   libcuda    the driver library ldconfig finds (empty if none)
#   nvrtc_dir  the folder of libnvrtc.so.13 (a CUDA toolkit first, then python3's
#              nvidia/cu13/lib; empty if none), put first on LD_LIBRARY_PATH
# and exports the suites' settings: the cubin cache, the GPU required, no CPU emulator.
bin="${DOTS_MOE_GPU_BIN:-$root/gpu-bin}"
if [ -f "$bin/bundle.tar.xz" ]; then
    unpacked="$(mktemp -d)"
    tar -C "$unpacked" -xJf "$bin/bundle.tar.xz" && cp -r "$bin/kernel-cache" "$unpacked/" 2>/dev/null
    bin="$unpacked"
fi
libcuda=$(ldconfig -p 2>/dev/null | grep -m1 'libcuda.so.1 ' | sed 's/.*=> //')
nvrtc_dir=""
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$dir/libnvrtc.so.13" ] && { nvrtc_dir="$dir"; break; }
done
if [ -z "$nvrtc_dir" ] && command -v python3 > /dev/null; then
    for site in $(python3 -c 'import site, sysconfig; print(" ".join(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]))' 2>/dev/null); do
        [ -e "$site/nvidia/cu13/lib/libnvrtc.so.13" ] && { nvrtc_dir="$site/nvidia/cu13/lib"; break; }
    done
fi
[ -z "$nvrtc_dir" ] || export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The kernel suites run on the GPU here, not on the CPU emulator (DOTS_MOE_CXX=none).
export DOTS_MOE_KERNEL_CACHE="$bin/kernel-cache" DOTS_MOE_REQUIRE_GPU=1 DOTS_MOE_CXX=none RUST_BACKTRACE=1
