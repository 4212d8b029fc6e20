// An empty shared library whose SONAME is libtorch_python.so.
//
// torchvision's op library (_C_stable.so, built on the libtorch stable ABI) lists
// libtorch_python.so as DT_NEEDED but uses none of its symbols (`nm -D --undefined-only`
// shows only aoti_torch_* / torch_* from libtorch_cpu, libstdc++ and cudart). The real
// libtorch_python.so needs ~330 Py* symbols from libpython. Preloading this stub satisfies the
// dynamic linker instead, so jit_load runs a scripted detector with no Python library in the
// process at all (test jit_load_maskrcnn_without_python).
