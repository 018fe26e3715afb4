/*
 * server.rpc._infer_wire: ModelInfer's request and response wire format, read and written directly.
 *
 * Why it exists: a ModelInfer call through protobuf objects builds a message, reads a dozen
 * fields off it one attribute at a time, copies each input's raw contents into its own bytes
 * object, then builds a response message field by field for gRPC to serialise; at
 * concurrency 64 on two cores that Python is a tenth of what a request costs (docs/benchmarks.md,
 * "the bytes-in/bytes-out fast path"). Here one call reads the request's bytes and one call
 * writes the response's.
 *
 * It takes only what it fully understands: a request with raw_input_contents for every input,
 * fixed-size datatypes, request parameters (perf_analyzer and tritonclient send some) but none
 * on inputs or requested outputs, no typed contents, at most 16 inputs and 16 outputs of
 * at most 32 dimensions, non-empty tensors whose byte counts match their shapes, and no string
 * field given twice (protobuf checks every copy's UTF-8 and keeps the last; no client repeats
 * them, so this code declines rather than checking copies it would throw away). Anything
 * else, including every malformed or invalid request, returns None, and the caller parses it
 * with protobuf and the general path, which gives the error answers. So this code never
 * decides what is an error; it only declines.
 *
 * Python API:
 *   parse_request(data: bytes) -> tuple | None
 *     (model_name, model_version, id, inputs, outputs, parameters) where inputs is a list of
 *     (name, datatype, shape: tuple[int, ...], offset: int, count: int): the input's raw
 *     contents are `count` elements at byte `offset` of `data`; outputs is a list of names;
 *     parameters a dict of the request's parameters as bool, int, float or str (one whose
 *     value sets none of them is left out, as converters.params_from_pb does).
 *   encode_response(model_name, model_version, id, outputs) -> bytes
 *     outputs: a sequence of (name, datatype, shape, contents) where contents supports the
 *     buffer protocol (C-contiguous); the bytes are what protobuf's SerializeToString writes
 *     for the same ModelInferResponse with no parameters.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_TENSORS 16
#define MAX_DIMS 32

enum { WIRE_VARINT = 0, WIRE_I64 = 1, WIRE_LEN = 2 };

/* ModelInferRequest / ModelInferResponse field numbers (protos/grpc_service.proto). */
enum {
    REQ_MODEL_NAME = 1, REQ_MODEL_VERSION = 2, REQ_ID = 3, REQ_PARAMETERS = 4, REQ_INPUTS = 5, REQ_OUTPUTS = 6,
    REQ_RAW = 7,
    ENTRY_KEY = 1, ENTRY_VALUE = 2,
    PARAM_BOOL = 1, PARAM_INT64 = 2, PARAM_STRING = 3, PARAM_DOUBLE = 4, PARAM_UINT64 = 5,
    INPUT_NAME = 1, INPUT_DATATYPE = 2, INPUT_SHAPE = 3,
    OUTPUT_NAME = 1,
    RESP_MODEL_NAME = 1, RESP_MODEL_VERSION = 2, RESP_ID = 3, RESP_OUTPUTS = 5, RESP_RAW = 6,
    TENSOR_NAME = 1, TENSOR_DATATYPE = 2, TENSOR_SHAPE = 3,
};

/* The fixed-size datatypes and their sizes; BYTES (length-prefixed elements) is left to the general path. */
static const struct { const char *name; Py_ssize_t size; } DATATYPES[] = {
    {"BOOL", 1}, {"UINT8", 1}, {"UINT16", 2}, {"UINT32", 4}, {"UINT64", 8}, {"INT8", 1},
    {"INT16", 2}, {"INT32", 4}, {"INT64", 8}, {"FP16", 2}, {"FP32", 4}, {"FP64", 8},
};
#define N_DATATYPES (sizeof(DATATYPES) / sizeof(DATATYPES[0]))
/* The names as interned str objects, made once: every parsed input shares them. */
static PyObject *datatype_names[N_DATATYPES];

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Reader;

typedef struct {
    const uint8_t *data;
    Py_ssize_t size;
} Slice;

/* A varint; 0 when truncated or longer than protobuf allows. */
static int read_varint(Reader *r, uint64_t *out)
{
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) {
            return 0;
        }
        uint8_t byte = *r->p++;
        if (shift == 63 && byte > 1) {
            return 0;
        }
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* The next field's number and wire type; 0 on anything but varint, fixed64 and length-delimited. */
static int read_tag(Reader *r, uint32_t *field, int *wire)
{
    uint64_t tag;
    if (!read_varint(r, &tag) || tag > UINT32_MAX) {
        return 0;
    }
    *field = (uint32_t)(tag >> 3);
    *wire = (int)(tag & 7);
    return *field != 0 && (*wire == WIRE_VARINT || *wire == WIRE_I64 || *wire == WIRE_LEN);
}

/* A singular string field's value, kept only if it is the first: 0 when it was already set. */
static int set_once(Slice *target, int *seen, Slice value)
{
    if (*seen) {
        return 0;
    }
    *seen = 1;
    *target = value;
    return 1;
}

/* Appends to a list of at most MAX_TENSORS slices: 0 when it is full. */
static int append(Slice *list, int *count, Slice value)
{
    if (*count == MAX_TENSORS) {
        return 0;
    }
    list[(*count)++] = value;
    return 1;
}

/* A length-delimited field's contents. */
static int read_slice(Reader *r, Slice *out)
{
    uint64_t length;
    if (!read_varint(r, &length) || length > (uint64_t)(r->end - r->p)) {
        return 0;
    }
    out->data = r->p;
    out->size = (Py_ssize_t)length;
    r->p += length;
    return 1;
}

typedef struct {
    Slice name;
    Slice datatype;
    int has_name, has_datatype;
    uint64_t dims[MAX_DIMS];
    int ndims;
} InputTensor;

/* Appends one dimension; 0 past MAX_DIMS. */
static int add_dim(InputTensor *tensor, uint64_t dim)
{
    if (tensor->ndims >= MAX_DIMS) {
        return 0;
    }
    tensor->dims[tensor->ndims++] = dim;
    return 1;
}

/* An InferInputTensor with only name, datatype and shape (packed or not); 0 for anything else. */
static int parse_input(Slice message, InputTensor *tensor)
{
    Reader r = {message.data, message.data + message.size};
    memset(tensor, 0, sizeof(*tensor));
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        Slice value;
        uint64_t dim;
        if (!read_tag(&r, &field, &wire)) {
            return 0;
        }
        if (field == INPUT_SHAPE && wire == WIRE_VARINT) {
            if (!read_varint(&r, &dim) || !add_dim(tensor, dim)) {
                return 0;
            }
            continue;
        }
        if (wire != WIRE_LEN || !read_slice(&r, &value)) {
            return 0;
        }
        if (field == INPUT_NAME) {
            if (!set_once(&tensor->name, &tensor->has_name, value)) {
                return 0;
            }
        } else if (field == INPUT_DATATYPE) {
            if (!set_once(&tensor->datatype, &tensor->has_datatype, value)) {
                return 0;
            }
        } else if (field == INPUT_SHAPE) {
            Reader packed = {value.data, value.data + value.size};
            while (packed.p < packed.end) {
                if (!read_varint(&packed, &dim) || !add_dim(tensor, dim)) {
                    return 0;
                }
            }
        } else {
            return 0; /* parameters, typed contents, or a field this code does not know */
        }
    }
    return 1;
}

/* An InferRequestedOutputTensor with only a name; 0 for anything else (parameters: classification). */
static int parse_output(Slice message, Slice *name)
{
    Reader r = {message.data, message.data + message.size};
    int has_name = 0;
    name->data = message.data;
    name->size = 0;
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        Slice value;
        if (!read_tag(&r, &field, &wire) || field != OUTPUT_NAME || wire != WIRE_LEN || !read_slice(&r, &value)
            || !set_once(name, &has_name, value)) {
            return 0;
        }
    }
    return 1;
}

/* The index of a fixed-size datatype, or -1. */
static int datatype_index(Slice name)
{
    for (size_t i = 0; i < N_DATATYPES; i++) {
        if ((size_t)name.size == strlen(DATATYPES[i].name) && memcmp(name.data, DATATYPES[i].name, name.size) == 0) {
            return (int)i;
        }
    }
    return -1;
}

/* The element count of a shape whose contents are `size` bytes of `item` bytes each; -1 when they
 * do not match or a dimension is zero or negative (the general path words those errors). */
static Py_ssize_t matching_count(const InputTensor *tensor, Py_ssize_t item, Py_ssize_t size)
{
    uint64_t count = 1;
    uint64_t limit = (uint64_t)(size / item);
    for (int i = 0; i < tensor->ndims; i++) {
        uint64_t dim = tensor->dims[i];
        /* Every dimension is >= 1, so the running product may never exceed the elements the bytes
         * hold; checked before multiplying, so it cannot overflow whatever the sizes. */
        if (dim == 0 || dim > limit / count) {
            return -1;
        }
        count *= dim;
    }
    return count * (uint64_t)item == (uint64_t)size ? (Py_ssize_t)count : -1;
}

/* A str from UTF-8 bytes; NULL with the error cleared when they are not valid UTF-8. */
static PyObject *utf8(Slice s)
{
    PyObject *text = PyUnicode_DecodeUTF8((const char *)s.data, s.size, "strict");
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
    }
    return text;
}

/* An InferParameter's value as bool, int, float or str; Py_None when it sets none (a new reference
 * either way); NULL with no error set to decline (a wire type protobuf would keep as an unknown
 * field, invalid UTF-8), NULL with an error set on a Python failure. */
static PyObject *parameter_value(Slice message)
{
    Reader r = {message.data, message.data + message.size};
    PyObject *value = Py_NewRef(Py_None);
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        uint64_t number = 0;
        Slice text;
        PyObject *next;
        if (!read_tag(&r, &field, &wire)) {
            goto decline;
        }
        /* A oneof: the last member on the wire is the one set. */
        if (wire == WIRE_VARINT && (field == PARAM_BOOL || field == PARAM_INT64 || field == PARAM_UINT64)) {
            if (!read_varint(&r, &number)) {
                goto decline;
            }
            next = field == PARAM_BOOL ? PyBool_FromLong(number != 0)
                   : field == PARAM_INT64 ? PyLong_FromLongLong((long long)number)
                                          : PyLong_FromUnsignedLongLong(number);
        } else if (wire == WIRE_I64 && field == PARAM_DOUBLE) {
            double real;
            if (r.end - r.p < 8) {
                goto decline;
            }
            memcpy(&real, r.p, 8); /* little-endian on the wire and on every platform this builds for */
            r.p += 8;
            next = PyFloat_FromDouble(real);
        } else if (wire == WIRE_LEN && field == PARAM_STRING) {
            if (!read_slice(&r, &text) || (next = utf8(text)) == NULL) {
                goto decline;
            }
        } else {
            goto decline;
        }
        Py_SETREF(value, next);
        if (value == NULL) {
            return NULL;
        }
    }
    return value;
decline:
    Py_XDECREF(value);
    return NULL;
}

/* Adds one ParametersEntry to `parameters`: 1 done, 0 declined, -1 on a Python error. */
static int add_parameter(Slice entry, PyObject *parameters)
{
    Reader r = {entry.data, entry.data + entry.size};
    Slice key = {entry.data, 0}, message = {entry.data, 0};
    int has_key = 0, has_value = 0;
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        Slice value;
        if (!read_tag(&r, &field, &wire) || wire != WIRE_LEN || !read_slice(&r, &value)) {
            return 0;
        }
        if (field == ENTRY_KEY) {
            if (!set_once(&key, &has_key, value)) {
                return 0;
            }
        } else if (field == ENTRY_VALUE) {
            if (!set_once(&message, &has_value, value)) {
                return 0; /* a second value: protobuf merges the two */
            }
        } else {
            return 0; /* an unknown field */
        }
    }
    PyObject *name = utf8(key);
    if (name == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *value = parameter_value(message);
    int status;
    if (value == NULL) {
        status = PyErr_Occurred() ? -1 : 0;
    } else if (value == Py_None) {
        /* Set to nothing: absent, even when an earlier entry with the same key set it (the last entry wins). */
        status = 1;
        if (PyDict_DelItem(parameters, name) < 0) {
            if (PyErr_ExceptionMatches(PyExc_KeyError)) {
                PyErr_Clear();
            } else {
                status = -1;
            }
        }
    } else {
        status = PyDict_SetItem(parameters, name, value) == 0 ? 1 : -1;
    }
    Py_DECREF(name);
    Py_XDECREF(value);
    return status;
}

static PyObject *build_request(const uint8_t *base, Slice strings[3], InputTensor *inputs, const int *types,
                               const Py_ssize_t *counts, Slice *raw, int n_inputs, Slice *outputs, int n_outputs,
                               PyObject *parameters)
{
    PyObject *result = NULL, *input_list = NULL, *output_list = NULL, *texts[3] = {NULL, NULL, NULL};
    for (int i = 0; i < 3; i++) {
        if ((texts[i] = utf8(strings[i])) == NULL) {
            goto done;
        }
    }
    if ((input_list = PyList_New(n_inputs)) == NULL || (output_list = PyList_New(n_outputs)) == NULL) {
        goto done;
    }
    for (int i = 0; i < n_inputs; i++) {
        PyObject *shape = PyTuple_New(inputs[i].ndims);
        PyObject *name = shape == NULL ? NULL : utf8(inputs[i].name);
        if (name == NULL) {
            Py_XDECREF(shape);
            goto done;
        }
        for (int d = 0; d < inputs[i].ndims; d++) {
            PyObject *dim = PyLong_FromUnsignedLongLong(inputs[i].dims[d]);
            if (dim == NULL) {
                Py_DECREF(shape);
                Py_DECREF(name);
                goto done;
            }
            PyTuple_SET_ITEM(shape, d, dim);
        }
        PyObject *entry = Py_BuildValue("(NONnn)", name, datatype_names[types[i]], shape,
                                        (Py_ssize_t)(raw[i].data - base), counts[i]);
        if (entry == NULL) {
            goto done;
        }
        PyList_SET_ITEM(input_list, i, entry);
    }
    for (int i = 0; i < n_outputs; i++) {
        PyObject *name = utf8(outputs[i]);
        if (name == NULL) {
            goto done;
        }
        PyList_SET_ITEM(output_list, i, name);
    }
    result = PyTuple_Pack(6, texts[0], texts[1], texts[2], input_list, output_list, parameters);
done:
    for (int i = 0; i < 3; i++) {
        Py_XDECREF(texts[i]);
    }
    Py_XDECREF(input_list);
    Py_XDECREF(output_list);
    if (result == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE; /* invalid UTF-8: the general path answers it */
    }
    return result;
}

static PyObject *parse_request(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse_request takes bytes");
        return NULL;
    }
    const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(arg);
    Reader r = {base, base + PyBytes_GET_SIZE(arg)};
    Slice strings[3] = {{base, 0}, {base, 0}, {base, 0}};
    int has_string[3] = {0, 0, 0};
    Slice input_messages[MAX_TENSORS], raw[MAX_TENSORS], outputs[MAX_TENSORS];
    int n_inputs = 0, n_raw = 0, n_outputs = 0, added;
    PyObject *parameters = PyDict_New(), *result;
    if (parameters == NULL) {
        return NULL;
    }
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        Slice value;
        if (!read_tag(&r, &field, &wire) || wire != WIRE_LEN || !read_slice(&r, &value)) {
            goto decline;
        }
        switch (field) {
        case REQ_MODEL_NAME:
        case REQ_MODEL_VERSION:
        case REQ_ID:
            if (!set_once(&strings[field - REQ_MODEL_NAME], &has_string[field - REQ_MODEL_NAME], value)) {
                goto decline;
            }
            break;
        case REQ_PARAMETERS:
            if ((added = add_parameter(value, parameters)) < 0) {
                Py_DECREF(parameters);
                return NULL;
            }
            if (added == 0) {
                goto decline;
            }
            break;
        case REQ_INPUTS:
            if (!append(input_messages, &n_inputs, value)) {
                goto decline;
            }
            break;
        case REQ_OUTPUTS:
            if (n_outputs == MAX_TENSORS || !parse_output(value, &outputs[n_outputs])) {
                goto decline;
            }
            n_outputs++;
            break;
        case REQ_RAW:
            if (!append(raw, &n_raw, value)) {
                goto decline;
            }
            break;
        default:
            goto decline; /* a field this code does not know */
        }
    }
    if (n_inputs == 0 || n_raw != n_inputs) {
        goto decline;
    }
    InputTensor inputs[MAX_TENSORS];
    int types[MAX_TENSORS];
    Py_ssize_t counts[MAX_TENSORS];
    for (int i = 0; i < n_inputs; i++) {
        if (!parse_input(input_messages[i], &inputs[i]) || inputs[i].name.size == 0
            || (types[i] = datatype_index(inputs[i].datatype)) < 0
            || (counts[i] = matching_count(&inputs[i], DATATYPES[types[i]].size, raw[i].size)) < 0) {
            goto decline;
        }
    }
    result = build_request(base, strings, inputs, types, counts, raw, n_inputs, outputs, n_outputs, parameters);
    Py_DECREF(parameters);
    return result;
decline:
    Py_DECREF(parameters);
    Py_RETURN_NONE;
}

/* ---- The response ---- */

static size_t varint_size(uint64_t value)
{
    size_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

static uint8_t *write_varint(uint8_t *out, uint64_t value)
{
    while (value >= 0x80) {
        *out++ = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    *out++ = (uint8_t)value;
    return out;
}

/* A length-delimited field's size on the wire: tag, length, contents (every tag here is one byte). */
static size_t field_size(size_t length)
{
    return 1 + varint_size(length) + length;
}

static uint8_t *write_field(uint8_t *out, int field, const void *data, size_t length)
{
    *out++ = (uint8_t)((field << 3) | WIRE_LEN);
    out = write_varint(out, length);
    memcpy(out, data, length);
    return out + length;
}

/* One output's parts, gathered before anything is written so that sizes are known. */
typedef struct {
    const char *name, *datatype;
    Py_ssize_t name_size, datatype_size;
    uint64_t dims[MAX_DIMS];
    int ndims;
    size_t shape_size;   /* the packed dimensions' bytes */
    size_t tensor_size;  /* the InferOutputTensor message's bytes */
    Py_buffer contents;
} Output;

/* Proto3 leaves empty strings and empty repeated scalars out; the writer does the same. */
static size_t tensor_message_size(Output *o)
{
    o->shape_size = 0;
    for (int d = 0; d < o->ndims; d++) {
        o->shape_size += varint_size(o->dims[d]);
    }
    return (o->name_size ? field_size(o->name_size) : 0) + (o->datatype_size ? field_size(o->datatype_size) : 0)
           + (o->ndims ? field_size(o->shape_size) : 0);
}

static int gather_output(PyObject *item, Output *o)
{
    PyObject *shape;
    PyObject *name, *datatype, *contents;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
        PyErr_SetString(PyExc_TypeError, "each output is (name, datatype, shape, contents)");
        return 0;
    }
    name = PyTuple_GET_ITEM(item, 0);
    datatype = PyTuple_GET_ITEM(item, 1);
    shape = PyTuple_GET_ITEM(item, 2);
    contents = PyTuple_GET_ITEM(item, 3);
    if (!PyUnicode_Check(name) || !PyUnicode_Check(datatype) || !PyTuple_Check(shape)) {
        PyErr_SetString(PyExc_TypeError, "an output's name and datatype are str and its shape a tuple");
        return 0;
    }
    if ((o->name = PyUnicode_AsUTF8AndSize(name, &o->name_size)) == NULL
        || (o->datatype = PyUnicode_AsUTF8AndSize(datatype, &o->datatype_size)) == NULL) {
        return 0;
    }
    o->ndims = (int)PyTuple_GET_SIZE(shape);
    if (o->ndims > MAX_DIMS) {
        PyErr_SetString(PyExc_ValueError, "an output has more than 32 dimensions");
        return 0;
    }
    for (int d = 0; d < o->ndims; d++) {
        /* int64 on the wire: a negative dimension is its 64-bit two's complement, as protobuf writes it. */
        long long dim = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
        if (dim == -1 && PyErr_Occurred()) {
            return 0;
        }
        o->dims[d] = (uint64_t)dim;
    }
    o->tensor_size = tensor_message_size(o);
    return PyObject_GetBuffer(contents, &o->contents, PyBUF_C_CONTIGUOUS) == 0;
}

static PyObject *encode_response(PyObject *self, PyObject *args)
{
    (void)self;
    const char *strings[3];
    Py_ssize_t sizes[3];
    PyObject *outputs_arg, *outputs = NULL, *result = NULL;
    Output parts[MAX_TENSORS];
    Py_ssize_t n = 0, gathered = 0;
    if (!PyArg_ParseTuple(args, "s#s#s#O", &strings[0], &sizes[0], &strings[1], &sizes[1], &strings[2], &sizes[2],
                          &outputs_arg)) {
        return NULL;
    }
    /* A tuple of its own: the items (tuples, str, buffers) then live until the end whatever the Python code that
     * reading a dimension (__index__) or a buffer may run does to the caller's list. */
    if ((outputs = PySequence_Tuple(outputs_arg)) == NULL) {
        return NULL;
    }
    n = PyTuple_GET_SIZE(outputs);
    if (n > MAX_TENSORS) {
        PyErr_SetString(PyExc_ValueError, "more than 16 outputs");
        goto done;
    }
    size_t total = 0;
    for (int i = 0; i < 3; i++) {
        total += sizes[i] ? field_size(sizes[i]) : 0;
    }
    for (; gathered < n; gathered++) {
        if (!gather_output(PyTuple_GET_ITEM(outputs, gathered), &parts[gathered])) {
            goto done;
        }
        total += field_size(parts[gathered].tensor_size) + field_size(parts[gathered].contents.len);
    }
    if ((result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total)) == NULL) {
        goto done;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    static const int string_fields[3] = {RESP_MODEL_NAME, RESP_MODEL_VERSION, RESP_ID};
    for (int i = 0; i < 3; i++) {
        if (sizes[i]) {
            out = write_field(out, string_fields[i], strings[i], sizes[i]);
        }
    }
    /* Field order as protobuf serialises: every output tensor (5), then every raw contents (6). */
    for (Py_ssize_t i = 0; i < n; i++) {
        Output *o = &parts[i];
        *out++ = (uint8_t)((RESP_OUTPUTS << 3) | WIRE_LEN);
        out = write_varint(out, o->tensor_size);
        if (o->name_size) {
            out = write_field(out, TENSOR_NAME, o->name, o->name_size);
        }
        if (o->datatype_size) {
            out = write_field(out, TENSOR_DATATYPE, o->datatype, o->datatype_size);
        }
        if (o->ndims) {
            *out++ = (uint8_t)((TENSOR_SHAPE << 3) | WIRE_LEN);
            out = write_varint(out, o->shape_size);
            for (int d = 0; d < o->ndims; d++) {
                out = write_varint(out, o->dims[d]);
            }
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out = write_field(out, RESP_RAW, parts[i].contents.buf, parts[i].contents.len);
    }
done:
    for (Py_ssize_t i = 0; i < gathered; i++) {
        PyBuffer_Release(&parts[i].contents);
    }
    Py_DECREF(outputs);
    return result;
}

static PyMethodDef methods[] = {
    {"parse_request", parse_request, METH_O,
     "A ModelInferRequest's bytes as (model_name, model_version, id, inputs, outputs), or None for the general path."},
    {"encode_response", encode_response, METH_VARARGS,
     "A ModelInferResponse's bytes from (model_name, model_version, id, outputs)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_infer_wire", "ModelInfer's wire format, read and written directly.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__infer_wire(void)
{
    for (size_t i = 0; i < N_DATATYPES; i++) {
        if ((datatype_names[i] = PyUnicode_InternFromString(DATATYPES[i].name)) == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
