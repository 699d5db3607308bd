// The kernels compiled for baseline x86-64 (or whatever the compiler targets by default).
#include "kernel_common.h"

#define PK_ISA base
#include "kernel_impl.h"
