// Per-thread slots for scopes Graft opens around a computation on the calling thread (see the header).
#include "CGraftKernels.h"

static _Thread_local void *factor_copies_scope;

void *cgraft_factor_copies_scope(void) { return factor_copies_scope; }

void cgraft_set_factor_copies_scope(void *scope) { factor_copies_scope = scope; }
