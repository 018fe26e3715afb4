/*
 * server.core._sampling: the next-token draw of server/core/sampling.py, row by row in C.
 *
 * Why it exists: a decode step of one stream takes about 2 ms in ONNX Runtime, and the
 * numpy version of the draw spends 150-200 us in a dozen small numpy calls that run on
 * caches the step has just flushed. Here one call does the whole batch in a few
 * microseconds. sampling.py keeps the numpy version as the reference (and the fallback
 * when this module was not compiled); the tests check that both choose the same tokens.
 *
 * Every step mirrors the numpy code in the same floating-point order, so the choices are
 * the same: scores are widened to double over the batch's width with -inf beyond the
 * row's allowed ids, sums that numpy computes by pairwise summation are computed the same
 * way here, and cumulative sums run left to right as numpy.cumsum does.
 *
 * Python API (all sequences have one item per row):
 *   sample_rows(logits, allowed, temperature, top_k, top_p, penalty, seen, uniform) -> list[int]
 *     logits: C-contiguous float32 buffer [rows, vocabulary]
 *     allowed: ids >= this are never chosen; the batch's width is the largest of them
 *     seen: ids already in the row (read only where penalty != 1)
 *     uniform: a number in [0, 1) per row, used only by rows that sample (not greedy)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* numpy's pairwise summation (what numpy.sum does along a contiguous axis of doubles). */
static double pairwise_sum(const double *a, Py_ssize_t n)
{
    if (n < 8) {
        double res = 0.0;
        for (Py_ssize_t i = 0; i < n; i++) {
            res += a[i];
        }
        return res;
    }
    if (n <= 128) {
        double r[8];
        Py_ssize_t i;
        for (int j = 0; j < 8; j++) {
            r[j] = a[j];
        }
        for (i = 8; i < n - (n % 8); i += 8) {
            for (int j = 0; j < 8; j++) {
                r[j] += a[i + j];
            }
        }
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) {
            res += a[i];
        }
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* numpy sorts NaN after every number: largest in ascending order, so first here. */
static int compare_desc(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    int a_nan = isnan(a), b_nan = isnan(b);
    if (a_nan || b_nan) {
        return b_nan - a_nan;
    }
    return (a < b) - (a > b);
}

/* Order of ids by probability, highest first, ties by id: a stable sort of -probs. */
typedef struct {
    double prob;
    Py_ssize_t id;
} ranked_t;

static int compare_ranked(const void *x, const void *y)
{
    const ranked_t *a = x, *b = y;
    int a_nan = isnan(a->prob), b_nan = isnan(b->prob);
    if (a_nan != b_nan) {
        return a_nan - b_nan; /* -NaN sorts last in numpy too */
    }
    if (!a_nan && a->prob != b->prob) {
        return a->prob < b->prob ? 1 : -1;
    }
    return (a->id > b->id) - (a->id < b->id);
}

/* The k-th largest of a[0..n) (k from 1), for rows without NaN; a is reordered. The same
 * value numpy.partition finds. Quickselect with a branch-free partition: on a few hundred
 * random scores the data-dependent branches of the textbook version cost more than the
 * comparisons themselves. */
static double kth_largest(double *a, Py_ssize_t n, Py_ssize_t k)
{
    Py_ssize_t lo = 0, hi = n, target = k - 1;
    while (hi - lo > 1) {
        /* Median of three as the pivot, moved to the end. */
        Py_ssize_t mid = lo + (hi - lo) / 2, last = hi - 1;
        double x = a[lo], y = a[mid], z = a[last];
        Py_ssize_t pick = (x < y) ? ((y < z) ? mid : ((x < z) ? last : lo)) : ((x < z) ? lo : ((y < z) ? last : mid));
        double pivot = a[pick];
        a[pick] = a[last];
        a[last] = pivot;
        /* Larger than the pivot to the left of store, smaller to the right; values equal
         * to it go to either side in turn, so long runs of ties still halve the range. */
        Py_ssize_t store = lo;
        for (Py_ssize_t i = lo; i < last; i++) {
            double v = a[i];
            a[i] = a[store];
            a[store] = v;
            store += (v > pivot) | ((v == pivot) & (int)(i & 1));
        }
        a[last] = a[store];
        a[store] = pivot;
        if (target == store) {
            return pivot;
        }
        if (target < store) {
            hi = store;
        } else {
            lo = store + 1;
        }
    }
    return a[target];
}

/* Reads item i of a sequence (from PySequence_Fast) as a double / a long long. */
static int item_double(PyObject *seq, Py_ssize_t i, double *out)
{
    *out = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int item_long(PyObject *seq, Py_ssize_t i, long long *out)
{
    *out = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Chooses the token of one row; scores holds the row widened to double (width long). */
static int sample_one(double *scores, Py_ssize_t width, double temperature, long long top_k,
                      double top_p, double uniform, double *scratch, ranked_t *ranked,
                      long long *choice)
{
    if (temperature == 0.0 || top_k == 1) {
        /* numpy.argmax: the first largest value, or the first NaN. */
        Py_ssize_t best = 0;
        for (Py_ssize_t i = 0; i < width; i++) {
            if (isnan(scores[i])) {
                best = i;
                break;
            }
            if (scores[i] > scores[best]) {
                best = i;
            }
        }
        *choice = best;
        return 0;
    }
    for (Py_ssize_t i = 0; i < width; i++) {
        scores[i] /= temperature;
    }
    int has_nan = 0;
    for (Py_ssize_t i = 0; i < width; i++) {
        has_nan |= isnan(scores[i]);
    }
    long long k = top_k < width ? top_k : width;
    if (k > 0) {
        /* Keep scores at or above the k-th largest (ties kept), as numpy.partition finds it. */
        memcpy(scratch, scores, (size_t)width * sizeof(double));
        double kth;
        if (has_nan) {
            qsort(scratch, (size_t)width, sizeof(double), compare_desc);
            kth = scratch[k - 1];
        } else {
            kth = kth_largest(scratch, width, (Py_ssize_t)k);
        }
        for (Py_ssize_t i = 0; i < width; i++) {
            if (scores[i] < kth) {
                scores[i] = -INFINITY;
            }
        }
    }
    double top = scores[0];
    for (Py_ssize_t i = 1; i < width; i++) {
        if (scores[i] > top) {
            top = scores[i];
        }
    }
    for (Py_ssize_t i = 0; i < width; i++) {
        /* exp(-inf) is 0: skip the call for ids top_k cut (most of them); a row of only -inf
         * gives NaN weights, as in numpy. */
        scores[i] = scores[i] == -INFINITY && top != -INFINITY ? 0.0 : exp(scores[i] - top);
    }
    if (top_p < 1.0) {
        double total = 0.0 + pairwise_sum(scores, width);
        /* Rank ids by probability, highest first, ties by id (numpy's stable argsort of
         * -probs). Ids of probability 0 (cut by top_k) rank after the rest in id order and
         * add nothing to the mass, so only the others need sorting (all of them with NaN). */
        Py_ssize_t ranked_count = 0, zeros = 0;
        for (Py_ssize_t i = 0; i < width; i++) {
            scores[i] /= total;
            if (has_nan || isnan(scores[i]) || scores[i] != 0.0) {
                ranked[ranked_count].prob = scores[i];
                ranked[ranked_count].id = i;
                ranked_count++;
            } else {
                zeros++;
            }
        }
        qsort(ranked, (size_t)ranked_count, sizeof(ranked_t), compare_ranked);
        /* Keep the most likely ids until their mass reaches top_p, the crossing one included. */
        double mass = 0.0;
        Py_ssize_t keep = 0;
        for (Py_ssize_t j = 0; j < ranked_count; j++) {
            mass += ranked[j].prob;
            if (mass < top_p) {
                keep++;
            }
        }
        if (mass < top_p) {
            keep += zeros; /* the zeros that follow leave the mass where it is */
        }
        keep += 1;
        for (Py_ssize_t j = keep; j < ranked_count; j++) {
            scores[ranked[j].id] = 0.0;
        }
    }
    /* Inverse-CDF draw over the kept weights. */
    double cumulative = 0.0;
    for (Py_ssize_t i = 0; i < width; i++) {
        cumulative += scores[i];
        scratch[i] = cumulative;
    }
    double target = uniform * cumulative;
    Py_ssize_t pick = 0;
    for (Py_ssize_t i = 0; i < width; i++) {
        if (scratch[i] <= target) {
            pick++;
        }
    }
    *choice = pick < width - 1 ? pick : width - 1;
    return 0;
}

static PyObject *sample_rows(PyObject *self, PyObject *args)
{
    PyObject *logits_obj, *allowed_obj, *temperature_obj, *top_k_obj, *top_p_obj, *penalty_obj;
    PyObject *seen_obj, *uniform_obj;
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &logits_obj, &allowed_obj, &temperature_obj, &top_k_obj,
                          &top_p_obj, &penalty_obj, &seen_obj, &uniform_obj)) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(logits_obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *seqs[7] = {NULL};
    PyObject *objs[7] = {allowed_obj, temperature_obj, top_k_obj, top_p_obj, penalty_obj, seen_obj, uniform_obj};
    double *scores = NULL, *scratch = NULL;
    ranked_t *ranked = NULL;
    if (view.ndim != 2 || view.format == NULL || strcmp(view.format, "f") != 0) {
        PyErr_SetString(PyExc_ValueError, "logits must be a 2-D float32 array");
        goto done;
    }
    Py_ssize_t rows = view.shape[0], vocabulary = view.shape[1];
    for (int s = 0; s < 7; s++) {
        seqs[s] = PySequence_Fast(objs[s], "sample_rows takes sequences");
        if (seqs[s] == NULL) {
            goto done;
        }
        if (PySequence_Fast_GET_SIZE(seqs[s]) != rows) {
            PyErr_SetString(PyExc_ValueError, "every sequence needs one item per row of logits");
            goto done;
        }
    }
    long long width = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        long long limit;
        if (item_long(seqs[0], r, &limit) < 0) {
            goto done;
        }
        if (limit < 1 || limit > vocabulary) {
            PyErr_SetString(PyExc_ValueError, "allowed must be between 1 and the vocabulary size");
            goto done;
        }
        width = limit > width ? limit : width;
    }
    scores = PyMem_Malloc((size_t)(width > 0 ? width : 1) * sizeof(double));
    scratch = PyMem_Malloc((size_t)(width > 0 ? width : 1) * sizeof(double));
    ranked = PyMem_Malloc((size_t)(width > 0 ? width : 1) * sizeof(ranked_t));
    result = PyList_New(rows);
    if (scores == NULL || scratch == NULL || ranked == NULL || result == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    const float *data = view.buf;
    for (Py_ssize_t r = 0; r < rows; r++) {
        long long limit, top_k;
        double temperature, top_p, penalty, uniform;
        if (item_long(seqs[0], r, &limit) < 0 || item_double(seqs[1], r, &temperature) < 0 ||
            item_long(seqs[2], r, &top_k) < 0 || item_double(seqs[3], r, &top_p) < 0 ||
            item_double(seqs[4], r, &penalty) < 0 || item_double(seqs[6], r, &uniform) < 0) {
            Py_CLEAR(result);
            goto done;
        }
        const float *row = data + r * vocabulary;
        for (Py_ssize_t i = 0; i < width; i++) {
            scores[i] = i < limit ? (double)row[i] : -INFINITY;
        }
        if (penalty != 1.0) {
            /* Each seen id once (numpy.unique), ids beyond the allowed ones untouched. */
            PyObject *seen = PySequence_Fast(PySequence_Fast_GET_ITEM(seqs[5], r), "seen must be sequences");
            if (seen == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            memset(scratch, 0, (size_t)width * sizeof(double));
            for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(seen); j++) {
                long long id;
                if (item_long(seen, j, &id) < 0) {
                    Py_DECREF(seen);
                    Py_CLEAR(result);
                    goto done;
                }
                if (id >= 0 && id < limit && scratch[id] == 0.0) {
                    scratch[id] = 1.0;
                    double v = scores[id];
                    scores[id] = v > 0 ? v / penalty : v * penalty;
                }
            }
            Py_DECREF(seen);
        }
        long long choice;
        sample_one(scores, (Py_ssize_t)width, temperature, top_k, top_p, uniform, scratch, ranked, &choice);
        PyObject *token = PyLong_FromLongLong(choice);
        if (token == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, r, token);
    }
done:
    for (int s = 0; s < 7; s++) {
        Py_XDECREF(seqs[s]);
    }
    PyMem_Free(scores);
    PyMem_Free(scratch);
    PyMem_Free(ranked);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"sample_rows", sample_rows, METH_VARARGS,
     "sample_rows(logits, allowed, temperature, top_k, top_p, penalty, seen, uniform) -> list[int]\n\n"
     "The next token of every row; the same choices as server.core.sampling's numpy path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sampling", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sampling(void)
{
    return PyModule_Create(&module);
}
