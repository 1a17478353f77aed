"""``prefetch(array, index)``: a cache-line prefetch hint for numba kernels (LLVM's
``llvm.prefetch``, a ``prefetcht0`` on x86). It asks the processor to start loading the line of
``array[index]`` and returns at once; it reads and writes no value, so it cannot change what a
kernel computes, only let independent cache misses overlap. ``index`` is an integer or a tuple
of integers, one per dimension. Without the JIT it does nothing."""

from __future__ import annotations

from numba import config, types

if config.DISABLE_JIT:

    def prefetch(array: object, index: object) -> None:
        """No-op: a hint has nothing to do in plain Python."""

else:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    _I32 = ir.IntType(32)
    # llvm.prefetch's constant arguments: a read, highest temporal locality (keep in every
    # cache level), data cache.
    _READ, _KEEP, _DATA = (ir.Constant(_I32, value) for value in (0, 3, 1))

    @intrinsic
    def prefetch(typingctx, array, index):
        """Prefetch the line of ``array[index]``. No bounds check and no wraparound: the
        address is only a hint, and a prefetch never faults, whatever the address."""
        signature = types.void(array, index)

        def codegen(context, builder, sig, args):
            array_type, index_type = sig.args
            if isinstance(index_type, types.BaseTuple):
                values = cgutils.unpack_tuple(builder, args[1], len(index_type))
                kinds = list(index_type)
            else:
                values, kinds = [args[1]], [index_type]
            indices = [
                context.cast(builder, value, kind, types.intp)
                for value, kind in zip(values, kinds, strict=True)
            ]
            view = context.make_array(array_type)(context, builder, args[0])
            address = cgutils.get_item_pointer(
                context, builder, array_type, view, indices, wraparound=False
            )
            pointer = builder.bitcast(address, ir.IntType(8).as_pointer())
            function = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [pointer.type, _I32, _I32, _I32]),
                "llvm.prefetch.p0i8",
            )
            builder.call(function, [pointer, _READ, _KEEP, _DATA])
            return context.get_dummy_value()

        return signature, codegen
