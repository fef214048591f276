/* include/graft.h as a Swift module: the C ABI's struct layouts, enums, versions and status table are read from
   the header itself, so Swift cannot drift from the contract. Shims are prefixed cgraft_. */
#ifndef CGRAFT_ABI_H
#define CGRAFT_ABI_H

#include "../../include/graft.h"

/* The description of a GRAFT_STATUS_MAP row (NULL for values that are not codes). */
static inline const char *cgraft_status_description(int32_t status) {
    switch (status) {
#define CGRAFT_DESCRIPTION_(name, code, description) case code: return description;
        GRAFT_STATUS_MAP(CGRAFT_DESCRIPTION_)
#undef CGRAFT_DESCRIPTION_
    default: return 0;
    }
}

/* The name of a GRAFT_STATUS_MAP row without its GRAFT_ prefix (NULL for values that are not codes). */
static inline const char *cgraft_status_name(int32_t status) {
    switch (status) {
#define CGRAFT_NAME_(name, code, description) case code: return #name;
        GRAFT_STATUS_MAP(CGRAFT_NAME_)
#undef CGRAFT_NAME_
    default: return 0;
    }
}

#endif
