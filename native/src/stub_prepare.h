/* What the stubs thaw ships (stub.c, agent.c) do last before they stop, so that a restore into
 * them has less to do (restorer.h):
 *
 *   - map the restorer's scratch area where restorer.h says (saves the restore an injected mmap);
 *   - leave the report of their special mappings in its last page (saves the restorer reading
 *     /proc/self/maps);
 *   - empty their capability bounding set (saves the restorer a credentials commit per
 *     capability; the restore drops any that are left). Effective capabilities stay: the restore
 *     needs them until its end.
 *
 * All best effort: a restore works into a stub that did none of it, only slower.
 */
#ifndef THAW_STUB_PREPARE_H
#define THAW_STUB_PREPARE_H

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#include "restorer.h"

static int thaw_is_special(const char *name)
{
    return !strcmp(name, "[vvar]") || !strcmp(name, "[vvar_vclock]") || !strcmp(name, "[vdso]");
}

static void thaw_write_stub_report(struct thaw_stub_report *report)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps)
        return;
    char line[4096 + 256], name[sizeof line];
    uint64_t n = 0;
    int complete = 1;
    while (fgets(line, sizeof line, maps)) {
        unsigned long long start, end;
        name[0] = 0;
        if (sscanf(line, "%llx-%llx %*s %*s %*s %*s %s", &start, &end, name) < 2 || !thaw_is_special(name))
            continue;
        if (n == THAW_SPECIALS_MAX) {
            complete = 0;
            break;
        }
        snprintf(report->specials[n].name, sizeof report->specials[n].name, "%s", name);
        report->specials[n].start = start;
        report->specials[n].end = end;
        n++;
    }
    fclose(maps);
    report->nspecials = n;
    report->magic = complete ? THAW_STUB_REPORT_MAGIC : 0;
}

static void thaw_stub_prepare(void)
{
    void *scratch = mmap((void *)THAW_STUB_SCRATCH, THAW_STUB_SCRATCH_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (scratch == (void *)THAW_STUB_SCRATCH)
        thaw_write_stub_report((struct thaw_stub_report *)THAW_STUB_REPORT);
    for (int cap = 0; cap <= 63; cap++)
        prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
}

#endif
