// Per-thread slots for scopes Graft opens around a computation on the calling thread (see the header).
#include "CGraftKernels.h"

static _Thread_local void *half_copies_scope;

void *cgraft_half_copies_scope(void) { return half_copies_scope; }

void cgraft_set_half_copies_scope(void *scope) { half_copies_scope = scope; }
