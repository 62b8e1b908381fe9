/* The shared library the Python package loads: every public function of
   mustafar.h, exported.  Built by `make lib` into build/libmustafar.so. */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"

/* Sizes of the structures the bindings mirror with ctypes, so that the
   package refuses a library whose structures differ instead of passing
   misread fields: 0 context_desc, 1 cache_desc, 2 cache_stats, 3 paged_seq,
   4 paged_kv. */
MUSTAFAR_API size_t mustafar_binding_struct_size(int which);
MUSTAFAR_API size_t mustafar_binding_struct_size(int which)
{
    switch (which) {
    case 0: return sizeof(mustafar_context_desc);
    case 1: return sizeof(mustafar_cache_desc);
    case 2: return sizeof(mustafar_cache_stats);
    case 3: return sizeof(mustafar_paged_seq);
    case 4: return sizeof(mustafar_paged_kv);
    }
    return 0;
}
