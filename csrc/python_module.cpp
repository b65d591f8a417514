// Empty Python module `tsv_fast._C`: importing it loads this shared library,
// whose static initializers register the tsv_fast ops with the dispatcher.
// (Only built by setup.py; the CMake build links the ops without Python.)
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "tsv_fast compiled ops (see torch.ops.tsv_fast)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
