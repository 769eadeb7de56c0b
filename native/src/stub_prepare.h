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
 * The agent forks its stubs at restore time, so it does the costly parts once, at its start:
 * it empties its own bounding set (its stubs inherit that) and reads its special mappings (a
 * fork's are its parent's), and each stub only copies the report in.
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

/* Where the kernel put this process's special mappings. */
static void thaw_read_specials(struct thaw_stub_report *report)
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

/* A drop commits new credentials; a read is cheap, and nothing is left to drop after a fork of a
 * process that emptied its set already. */
static void thaw_empty_bounding_set(void)
{
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1)
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
}

/* `known`: the report of a parent this process is a fork of, NULL to read its own maps. */
static void thaw_stub_prepare(const struct thaw_stub_report *known)
{
    void *scratch = mmap((void *)THAW_STUB_SCRATCH, THAW_STUB_SCRATCH_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    struct thaw_stub_report *report = (struct thaw_stub_report *)THAW_STUB_REPORT;
    if (scratch == (void *)THAW_STUB_SCRATCH && known && known->magic == THAW_STUB_REPORT_MAGIC)
        memcpy(report, known, sizeof *report);
    else if (scratch == (void *)THAW_STUB_SCRATCH)
        thaw_read_specials(report);
    thaw_empty_bounding_set();
}

#endif
