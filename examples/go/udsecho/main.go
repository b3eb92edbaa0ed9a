// Command udsecho is the unix-socket baseline of the FFI benchmark: the same echo logic as
// ./echo behind a unix domain socket with a 4-byte big-endian length prefix per message.
//
//	udsecho /path/to/socket
package main

import (
	"bufio"
	"encoding/binary"
	"io"
	"log"
	"net"
	"os"
)

func serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 128*1024)
	w := bufio.NewWriterSize(c, 128*1024)
	var hdr [4]byte
	buf := make([]byte, 0, 128*1024)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if cap(buf) < int(n) {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		if _, err := io.ReadFull(r, buf); err != nil {
			return
		}
		// the same work as the FFI echo: answer the request bytes
		if _, err := w.Write(hdr[:]); err != nil {
			return
		}
		if _, err := w.Write(buf); err != nil {
			return
		}
		if err := w.Flush(); err != nil {
			return
		}
	}
}

func main() {
	path := os.Args[1]
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		log.Fatal(err)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go serve(c)
	}
}
