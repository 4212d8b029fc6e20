# The ops' bad-input and layout pytest cases against the ASan + UBSan build (OVERLAP_SAMPLER_SANITIZE),
# included from tests/cpp/CMakeLists.txt. Python and torch are not instrumented: libasan is preloaded
# so it comes first in the process (its allocator then also tracks torch's tensor storage, which is
# how a kernel reading past a tensor is caught), and leak checking is off (CPython and torch keep
# memory until exit by design).

# libstdc++ is preloaded too: Python does not link it, and ASan's C++ exception hook, resolved when
# ASan starts, would otherwise be missing at the first throw (GCC 12: "CHECK failed: ...
# real___cxa_throw != 0").
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  message(FATAL_ERROR "The sanitizer build preloads GCC's libasan: configure it with GCC (got "
                      "${CMAKE_CXX_COMPILER_ID})")
endif()
set(_preload "")
foreach(_lib libasan.so libstdc++.so)
  execute_process(
    COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=${_lib}
    OUTPUT_VARIABLE _path OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT IS_ABSOLUTE "${_path}" OR NOT EXISTS "${_path}")
    message(FATAL_ERROR "${CMAKE_CXX_COMPILER} does not know where ${_lib} is (got '${_path}')")
  endif()
  list(APPEND _preload ${_path})
endforeach()
string(JOIN " " _preload ${_preload})

# The package under test is a copy of python/overlap_sampler holding this build's _C and op library,
# made by the fixture below, seen through a venv of its own (no pip) whose one .pth file lists that
# copy and then the build venv's site-packages (torch, pytest). The build venv's own .pth files are
# then not read, so its editable install's import hook, which points `overlap_sampler` at the normal
# build, is never installed; child processes started with sys.executable see the same.
set(_tree ${CMAKE_CURRENT_BINARY_DIR}/python)
set(_venv ${CMAKE_CURRENT_BINARY_DIR}/venv)
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"
  OUTPUT_VARIABLE _site_packages OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
string(REPLACE "\n" ";" _site_packages "${_site_packages}")
list(REMOVE_DUPLICATES _site_packages)
execute_process(COMMAND ${Python_EXECUTABLE} -m venv --without-pip --clear ${_venv} COMMAND_ERROR_IS_FATAL ANY)
execute_process(
  COMMAND ${_venv}/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  OUTPUT_VARIABLE _venv_site_packages OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
list(JOIN _site_packages "\n" _pth)
file(WRITE ${_venv_site_packages}/overlap_sampler_asan.pth "${_tree}\n${_pth}\n")

file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/copy_python_tree.cmake [=[
file(REMOVE_RECURSE "${TREE}/overlap_sampler")
file(COPY "${SOURCE}/python/overlap_sampler" DESTINATION "${TREE}"
  PATTERN "*.so" EXCLUDE PATTERN "__pycache__" EXCLUDE)
file(COPY "${NATIVE}" "${OPS}" DESTINATION "${TREE}/overlap_sampler")
]=])
add_test(NAME sanitize_python_tree
  COMMAND ${CMAKE_COMMAND} -DSOURCE=${PROJECT_SOURCE_DIR} -DTREE=${_tree}
          -DNATIVE=$<TARGET_FILE:_C> -DOPS=$<TARGET_FILE:overlap_sampler_ops>
          -P ${CMAKE_CURRENT_BINARY_DIR}/copy_python_tree.cmake)
set_tests_properties(sanitize_python_tree PROPERTIES LABELS sanitize FIXTURES_SETUP sanitize_python_tree)

# Every case of these files that runs on the CPU (well under a minute on 2 cores); the property
# tests when that file exists (configure runs again at every scripts/sanitize.sh).
set(_pytest_files
  test_sample_bad_input.py test_sample_boundaries.py
  test_box_iou.py test_max_iou.py test_assign_bins.py test_weighted_sample.py
  test_ops_properties.py)
set(_pytest_paths "")
foreach(_file IN LISTS _pytest_files)
  if(EXISTS ${PROJECT_SOURCE_DIR}/tests/${_file})
    list(APPEND _pytest_paths tests/${_file})
  else()
    message(STATUS "sanitize: tests/${_file} not found, not run")
  endif()
endforeach()

# --capture=sys: a sanitizer report goes to the real stderr (into the ctest log), not into
# pytest's captured file descriptor that dies with the aborted process.
# max_allocation_size_mb + allocator_may_return_null: an allocation of tens of GiB (the regression
# cases of huge sizes) fails at once, as it would under a normal run's address-space limit, which
# ASan cannot run under (it reserves terabytes of address space for its shadow memory).
add_test(NAME pytest_asan
  COMMAND ${_venv}/bin/python -m pytest ${_pytest_paths} -v -p no:cacheprovider --capture=sys
  WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
set_tests_properties(pytest_asan PROPERTIES LABELS sanitize TIMEOUT 900
  FIXTURES_REQUIRED sanitize_python_tree
  ENVIRONMENT "LD_PRELOAD=${_preload};ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=8192;UBSAN_OPTIONS=print_stacktrace=1")
