/* A stand-in for Intel QPL 1.6's job API, for testing native/qpl.py on machines without QPL or IAA.
 *
 * It exports the six job entry points (qpl_get_job_size, qpl_init_job, qpl_execute_job,
 * qpl_submit_job, qpl_wait_job, qpl_fini_job) plus qpl_get_library_version, and does deflate and
 * inflate with zlib's raw deflate and a 4 KiB window (windowBits -12), the stream shape IAA
 * produces and accepts. It returns QPL's status codes (include/qpl/c_api/status.h).
 *
 * The job is read and written AT THE SAME OFFSETS AS THE REAL qpl_job: the struct below transcribes
 * the field list of include/qpl/c_api/job.h (intel/qpl, QPL 1.6), and the build must pass the offsets
 * the test wrote down from that header as -DQPL_OFF_<FIELD>=N; _Static_assert stops the build if
 * the two disagree. The offsets never come from the binding under test, so a wrong offset in the
 * binding makes it write where this library does not read, and the round trips fail.
 *
 * Build: gcc -shared -fPIC -O2 qpl_standin.c -o libqpl.so -lz -DQPL_OFF_NEXT_IN_PTR=0 ...
 * Test hooks: QPL_STANDIN_BUSY_EVERY=N makes every Nth qpl_submit_job report a busy queue.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* ---- the public types of QPL 1.6 that the layout depends on (defs.h, status.h, job.h) ---- */

typedef enum { qpl_path_auto = 0, qpl_path_hardware = 1, qpl_path_software = 2 } qpl_path_t;
typedef enum { qpl_op_decompress = 0x00, qpl_op_compress = 0x01 } qpl_operation;
typedef enum { qpl_level_1 = 1, qpl_level_3 = 3 } qpl_compression_levels;
typedef enum { qpl_compression_mode = 0, qpl_gathering_mode = 1 } qpl_statistics_mode;
typedef enum { qpl_mblk_size_none = 0 } qpl_mini_block_size;
typedef enum { qpl_ow_nom = 0 } qpl_out_format;
typedef enum { qpl_p_le_packed_array = 0 } qpl_parser;
typedef struct qpl_huffman_table *qpl_huffman_table_t;
typedef struct qpl_dictionary qpl_dictionary;

#define QPL_FLAG_FIRST 0x0001u
#define QPL_FLAG_LAST 0x0002u
#define QPL_FLAG_DYNAMIC_HUFFMAN 0x2000u
#define QPL_FLAG_OMIT_VERIFY 0x4000u

enum {
    QPL_STS_OK = 0,
    QPL_STS_MORE_OUTPUT_NEEDED = 2,
    QPL_STS_MORE_INPUT_NEEDED = 3,
    QPL_STS_QUEUES_ARE_BUSY_ERR = 5,
    QPL_STS_LIBRARY_INTERNAL_ERR = 6,
    QPL_STS_NULL_PTR_ERR = 50,
    QPL_STS_OPERATION_ERR = 51,
    QPL_STS_NOT_SUPPORTED_MODE_ERR = 52,
    QPL_STS_BAD_JOB_STRUCT_ERR = 53,
    QPL_STS_PATH_ERR = 54,
    QPL_STD_UNSUPPORTED_COMPRESSION_LEVEL = 87,
    QPL_STS_INVALID_DEFLATE_DATA_ERR = 100,
    QPL_STS_NO_MEM_ERR = 101,
    QPL_STS_INVALID_BLOCK_TYPE = 213,
    QPL_STS_INVALID_STORED_LEN_ERR = 214,
    QPL_STS_REF_BEFORE_START_ERR = 218,
    QPL_INIT_HW_NOT_SUPPORTED = 500,
};

struct qpl_aux_data {
    uint8_t *compress_state_ptr;
    uint8_t *decompress_state_ptr;
    uint8_t *analytics_state_ptr;
    uint8_t *middle_layer_buffer_ptr;
    uint8_t *hw_state_ptr;
    qpl_path_t path;
};

typedef struct {
    uint8_t *next_in_ptr;
    uint32_t available_in;
    uint32_t total_in;
    uint8_t *next_out_ptr;
    uint32_t available_out;
    uint32_t total_out;
    qpl_operation op;
    uint32_t flags;
    uint32_t crc;
    uint32_t xor_checksum;
    uint32_t last_bit_offset;
    qpl_compression_levels level;
    qpl_statistics_mode statistics_mode;
    qpl_huffman_table_t huffman_table;
    qpl_dictionary *dictionary;
    qpl_mini_block_size mini_block_size;
    uint64_t *idx_array;
    uint32_t idx_max_size;
    uint32_t idx_num_written;
    uint8_t decomp_end_processing;
    uint8_t ignore_start_bits;
    uint8_t ignore_end_bits;
    uint64_t crc64_poly;
    uint64_t crc64;
    uint8_t *next_src2_ptr;
    uint32_t available_src2;
    uint32_t src1_bit_width;
    uint32_t src2_bit_width;
    uint32_t num_input_elements;
    qpl_out_format out_bit_width;
    uint32_t param_low;
    uint32_t param_high;
    uint32_t drop_initial_bytes;
    uint32_t initial_output_index;
    qpl_parser parser;
    uint32_t first_index_min_value;
    uint32_t last_index_max_value;
    uint32_t sum_value;
    int32_t numa_id;
    struct qpl_aux_data data_ptr;
} qpl_job;

/* ---- the offsets the test wrote down from the header must be where the header puts them ---- */

#if !defined(QPL_OFF_NEXT_IN_PTR) || !defined(QPL_OFF_AVAILABLE_IN) || !defined(QPL_OFF_TOTAL_IN) ||         \
    !defined(QPL_OFF_NEXT_OUT_PTR) || !defined(QPL_OFF_AVAILABLE_OUT) || !defined(QPL_OFF_TOTAL_OUT) ||       \
    !defined(QPL_OFF_OP) || !defined(QPL_OFF_FLAGS) || !defined(QPL_OFF_LEVEL) || !defined(QPL_JOB_SIZE)
#error "build with -DQPL_OFF_<FIELD>=<offset> for every field and -DQPL_JOB_SIZE=<sizeof(qpl_job)>"
#endif
#define AT(field, off) _Static_assert(offsetof(qpl_job, field) == (off), #field " is not at " #off " in qpl_job")
AT(next_in_ptr, QPL_OFF_NEXT_IN_PTR);
AT(available_in, QPL_OFF_AVAILABLE_IN);
AT(total_in, QPL_OFF_TOTAL_IN);
AT(next_out_ptr, QPL_OFF_NEXT_OUT_PTR);
AT(available_out, QPL_OFF_AVAILABLE_OUT);
AT(total_out, QPL_OFF_TOTAL_OUT);
AT(op, QPL_OFF_OP);
AT(flags, QPL_OFF_FLAGS);
AT(level, QPL_OFF_LEVEL);
_Static_assert(sizeof(qpl_job) == QPL_JOB_SIZE, "sizeof(qpl_job) differs from the header's");

/* ---- the stand-in's private state, after the public struct (as QPL's own buffers are) ---- */

#define STANDIN_MAGIC 0x51504c31u /* "QPL1" */
struct standin_state {
    uint32_t magic;
    qpl_path_t path;
    int submitted;
    int status; /* of the submitted job, reported by qpl_wait_job */
};
#define STATE(job) ((struct standin_state *)((unsigned char *)(job) + sizeof(qpl_job)))

const char *qpl_get_library_version(void) { return "thaw stand-in for Intel QPL 1.6 (zlib, 4 KiB window)"; }

int qpl_get_job_size(qpl_path_t path, uint32_t *job_size_ptr) {
    if (!job_size_ptr) return QPL_STS_NULL_PTR_ERR;
    if (path > qpl_path_software) return QPL_STS_PATH_ERR;
    *job_size_ptr = sizeof(qpl_job) + sizeof(struct standin_state);
    return QPL_STS_OK;
}

int qpl_init_job(qpl_path_t path, qpl_job *job) {
    if (!job) return QPL_STS_NULL_PTR_ERR;
    if (path > qpl_path_software) return QPL_STS_PATH_ERR;
    if (path == qpl_path_hardware) return QPL_INIT_HW_NOT_SUPPORTED; /* no IAA here, as on a CPU without one */
    memset(job, 0, sizeof *job);
    job->level = qpl_level_1;
    job->numa_id = -1;
    job->data_ptr.path = path;
    *STATE(job) = (struct standin_state){STANDIN_MAGIC, path, 0, QPL_STS_OK};
    return QPL_STS_OK;
}

static int advance(qpl_job *job, const z_stream *z) {
    uint32_t in = job->available_in - z->avail_in, out = job->available_out - z->avail_out;
    job->next_in_ptr += in, job->available_in -= in, job->total_in += in;
    job->next_out_ptr += out, job->available_out -= out, job->total_out += out;
    return QPL_STS_OK;
}

static int deflate_job(qpl_job *job) {
    int zlevel = job->level == qpl_level_1 ? 1 : job->level == qpl_level_3 ? 6 : -1;
    if (zlevel < 0) return QPL_STD_UNSUPPORTED_COMPRESSION_LEVEL;
    /* Without DYNAMIC_HUFFMAN (and no table) QPL writes fixed-Huffman blocks: zlib's Z_FIXED. */
    int strategy = job->flags & QPL_FLAG_DYNAMIC_HUFFMAN ? Z_DEFAULT_STRATEGY : Z_FIXED;
    z_stream z = {0};
    if (deflateInit2(&z, zlevel, Z_DEFLATED, -12, 8, strategy) != Z_OK) return QPL_STS_NO_MEM_ERR;
    z.next_in = job->next_in_ptr, z.avail_in = job->available_in;
    z.next_out = job->next_out_ptr, z.avail_out = job->available_out;
    int rc = deflate(&z, Z_FINISH);
    deflateEnd(&z);
    if (rc != Z_STREAM_END) return QPL_STS_MORE_OUTPUT_NEEDED;
    return advance(job, &z);
}

static int inflate_status(const z_stream *z, int rc) {
    if (rc == Z_STREAM_END) return QPL_STS_OK;
    if (rc == Z_BUF_ERROR || rc == Z_OK) return z->avail_out == 0 ? QPL_STS_MORE_OUTPUT_NEEDED : QPL_STS_MORE_INPUT_NEEDED;
    const char *msg = z->msg ? z->msg : "";
    /* The whole output is in one call, so zlib only refuses a distance before the start of the data:
     * like QPL's software path, and unlike IAA's 4 KiB history, longer distances are read. */
    if (strstr(msg, "too far back")) return QPL_STS_REF_BEFORE_START_ERR;
    if (strstr(msg, "block type")) return QPL_STS_INVALID_BLOCK_TYPE;
    if (strstr(msg, "stored block")) return QPL_STS_INVALID_STORED_LEN_ERR;
    return QPL_STS_INVALID_DEFLATE_DATA_ERR;
}

static int inflate_job(qpl_job *job) {
    z_stream z = {0};
    if (inflateInit2(&z, -12) != Z_OK) return QPL_STS_NO_MEM_ERR;
    z.next_in = job->next_in_ptr, z.avail_in = job->available_in;
    z.next_out = job->next_out_ptr, z.avail_out = job->available_out;
    int rc = inflate(&z, Z_FINISH);
    int status = inflate_status(&z, rc);
    inflateEnd(&z);
    advance(job, &z);
    return status;
}

static int run(qpl_job *job) {
    if (!job) return QPL_STS_NULL_PTR_ERR;
    if (STATE(job)->magic != STANDIN_MAGIC) return QPL_STS_BAD_JOB_STRUCT_ERR; /* not initialized */
    /* One job, one whole stream: multi-job streams are not part of the stand-in. */
    if ((job->flags & (QPL_FLAG_FIRST | QPL_FLAG_LAST)) != (QPL_FLAG_FIRST | QPL_FLAG_LAST))
        return QPL_STS_NOT_SUPPORTED_MODE_ERR;
    if (!job->next_in_ptr || !job->next_out_ptr) return QPL_STS_NULL_PTR_ERR;
    if (job->op == qpl_op_compress) return deflate_job(job);
    if (job->op == qpl_op_decompress) return inflate_job(job);
    return QPL_STS_OPERATION_ERR;
}

int qpl_execute_job(qpl_job *job) { return run(job); }

static int busy_now(void) {
    static unsigned calls;
    const char *every = getenv("QPL_STANDIN_BUSY_EVERY");
    unsigned n = every ? (unsigned)strtoul(every, NULL, 10) : 0;
    return n && ++calls % n == 0;
}

/* Runs the job at once (as QPL's software path does) and keeps its status for qpl_wait_job. */
int qpl_submit_job(qpl_job *job) {
    if (!job) return QPL_STS_NULL_PTR_ERR;
    if (STATE(job)->magic != STANDIN_MAGIC) return QPL_STS_BAD_JOB_STRUCT_ERR;
    if (busy_now()) return QPL_STS_QUEUES_ARE_BUSY_ERR;
    STATE(job)->status = run(job);
    STATE(job)->submitted = 1;
    return QPL_STS_OK;
}

int qpl_wait_job(qpl_job *job) {
    if (!job) return QPL_STS_NULL_PTR_ERR;
    if (STATE(job)->magic != STANDIN_MAGIC || !STATE(job)->submitted) return QPL_STS_LIBRARY_INTERNAL_ERR;
    STATE(job)->submitted = 0;
    return STATE(job)->status;
}

int qpl_fini_job(qpl_job *job) {
    if (!job) return QPL_STS_NULL_PTR_ERR;
    if (STATE(job)->magic != STANDIN_MAGIC) return QPL_STS_BAD_JOB_STRUCT_ERR;
    STATE(job)->magic = 0;
    return QPL_STS_OK;
}
