/* The shared library the Python package loads: every public function of
   mustafar.h, exported.  Built by `make lib` into build/libmustafar.so. */
#define MUSTAFAR_IMPLEMENTATION
#include "../mustafar.h"
