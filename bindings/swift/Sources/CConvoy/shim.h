/* The installed convoy.h: its folder comes from `pkg-config --cflags convoy`
 * (-I<prefix>/include), or from -Xcc -I<repo>/include when building against a source tree. */
#include <convoy.h>
