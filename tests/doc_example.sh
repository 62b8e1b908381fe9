#!/bin/sh
# Compiles the EXAMPLE of mustafar.h's documentation, as it is written there,
# as C99 and as C++11: the example a reader copies first must build.
# Usage: doc_example.sh BUILD_DIR
set -e
BUILD=${1:-build}
src=$BUILD/doc_example.c
{
    echo '#define MUSTAFAR_IMPLEMENTATION'
    echo '#include "../mustafar.h"'
    echo 'void example(void **k, void **v, void **q, void **out, int prompt_len);'
    echo 'void example(void **k, void **v, void **q, void **out, int prompt_len) {'
    sed -n '/^   EXAMPLE (error checks left out)/,/^   OPTIONS/p' mustafar.h | sed '1d;$d' | sed 's/^       //'
    echo 'mustafar_cache_destroy(cache);'
    echo 'mustafar_context_destroy(ctx);'
    echo '}'
} > "$src"
grep -q mustafar_cache_decode_step "$src"
cc -std=c99 -Wall -Wextra -Wpedantic -Werror -I. -c "$src" -o "$BUILD/doc_example.o"
c++ -x c++ -std=c++11 -Wall -Wextra -Wpedantic -Werror -I. -c "$src" -o "$BUILD/doc_example.o"
