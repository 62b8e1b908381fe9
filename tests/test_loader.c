/* The run-time loader of the CUDA runtime and NVRTC, on any machine: a
   directory that does not exist, a file that is not a library, a runtime
   that lacks a function, a driver too old and no driver (stand-in
   libraries built from tests/fake_cuda.c).  Usage: test_loader BUILD_DIR.  Ends with
   "N passed, M failed". */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

static int passed, failed;
/* the machine's own CUDA may load after the candidates passed over */
#define ANY_BACKEND ((mustafar_backend)-1)

static void expect(int ok, const char *what, const char *message)
{
    if (ok) passed++;
    else failed++;
    printf("%s %s: %s\n", ok ? "ok  " : "FAIL", what, message);
}

/* Creates a context with cuda_path = dir; checks status and message text. */
static void check(const char *what, mustafar_backend backend, const char *dir,
                  mustafar_status want_status, mustafar_backend want_backend, const char *want_text)
{
    mustafar_context_desc d;
    mustafar_context *ctx = NULL;
    char buf[4096] = "";
    mustafar_status st;
    const char *message;
    memset(&d, 0, sizeof d);
    d.backend = backend;
    d.cuda_path = dir;
    d.error_buffer = buf;
    d.error_buffer_size = sizeof buf;
    st = mustafar_context_create(&d, &ctx);
    message = ctx ? mustafar_last_error(ctx) : buf;
    expect(st == want_status && (!ctx || (int)want_backend < 0 || mustafar_context_backend(ctx) == want_backend) &&
               strstr(message, want_text) != NULL,
           what, message);
    mustafar_context_destroy(ctx);
}

int main(int argc, char **argv)
{
    char dir[1024];
    const char *build = argc > 1 ? argv[1] : "build";
    snprintf(dir, sizeof dir, "%s/fake_cuda", build);
    check("driver too old: CUDA refused", MUSTAFAR_BACKEND_CUDA, dir,
          MUSTAFAR_ERROR_BACKEND_UNAVAILABLE, MUSTAFAR_BACKEND_CPU, "12.0 or newer is needed");
    check("driver too old: AUTO falls back to the CPU", MUSTAFAR_BACKEND_AUTO, dir, MUSTAFAR_OK,
          MUSTAFAR_BACKEND_CPU, "using the CPU backend: the CUDA driver supports CUDA 11.8");
    snprintf(dir, sizeof dir, "%s/fake_cuda_nodriver", build);
    check("no driver: AUTO falls back to the CPU, saying there is no driver", MUSTAFAR_BACKEND_AUTO, dir,
          MUSTAFAR_OK, MUSTAFAR_BACKEND_CPU, "(no NVIDIA driver is installed)");
    snprintf(dir, sizeof dir, "%s/fake_cuda_missing", build);
    check("a runtime without cudaLaunchKernelExC is passed over, saying so", MUSTAFAR_BACKEND_AUTO,
          dir, MUSTAFAR_OK, ANY_BACKEND, "has no cudaLaunchKernelExC");
    snprintf(dir, sizeof dir, "%s/fake_cuda_garbage", build);
    check("a file that is not a library is passed over, saying so", MUSTAFAR_BACKEND_AUTO, dir,
          MUSTAFAR_OK, ANY_BACKEND, "fake_cuda_garbage/libcudart.so.13");
    check("a directory that does not exist is passed over, saying so", MUSTAFAR_BACKEND_AUTO,
          "/nonexistent/mustafar", MUSTAFAR_OK, ANY_BACKEND, "/nonexistent/mustafar/libcudart.so.13");
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
