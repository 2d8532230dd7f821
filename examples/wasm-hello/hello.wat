;; Replies {"message":"Hello from Wasm!","event":<the event>} and logs a line to stderr.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; 0..16: iovec and result; 64..: constant text; 1024..: the event (up to 128 KiB - 1 KiB).
  (data (i32.const 64) "{\"message\":\"Hello from Wasm!\",\"event\":")   ;; 38 bytes
  (data (i32.const 112) "}\n")                                          ;; 2 bytes
  (data (i32.const 128) "null")                                         ;; 4 bytes
  (data (i32.const 144) "wasm-hello: invoked\n")                        ;; 20 bytes
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (local $n i32)
    (call $write (i32.const 2) (i32.const 144) (i32.const 20))
    (block $eof
      (loop $more
        (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $n)))
        (i32.store (i32.const 4) (i32.sub (i32.const 130048) (local.get $n)))
        (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (local.set $n (i32.add (local.get $n) (i32.load (i32.const 8))))
        (br_if $more (i32.lt_u (local.get $n) (i32.const 130048)))))
    (call $write (i32.const 1) (i32.const 64) (i32.const 38))
    (if (local.get $n)
      (then (call $write (i32.const 1) (i32.const 1024) (local.get $n)))
      (else (call $write (i32.const 1) (i32.const 128) (i32.const 4))))
    (call $write (i32.const 1) (i32.const 112) (i32.const 2))))
