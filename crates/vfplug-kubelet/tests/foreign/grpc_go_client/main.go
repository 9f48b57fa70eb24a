// A grpc-go client of vfplugd's device-plugin socket that dials the way kubelets before 1.26
// did (kubelet 1.20 pkg/kubelet/cm/devicemanager: grpc.DialContext on the bare socket path with
// a unix ContextDialer and no WithAuthority), so grpc-go sends the path as :authority.
//
// Built in GOPATH mode against Debian's golang-google-grpc-dev; no generated stubs: a raw-bytes
// codec and hand-encoded protobuf messages keep it free of protoc plugins.
//
// Usage: main -socket PATH -authority kubelet|percent|localhost -device ID
// Prints one JSON line; exits non-zero when a call fails.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"time"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// field encodes a length-delimited protobuf field (lengths below 128).
func field(num byte, b []byte) []byte {
	return append([]byte{num<<3 | 2, byte(len(b))}, b...)
}

func fail(format string, a ...interface{}) {
	out, _ := json.Marshal(map[string]string{"error": fmt.Sprintf(format, a...)})
	fmt.Println(string(out))
	os.Exit(1)
}

func main() {
	sock := flag.String("socket", "", "device-plugin socket")
	mode := flag.String("authority", "kubelet", "kubelet | percent | localhost")
	device := flag.String("device", "", "a healthy device id")
	flag.Parse()

	opts := []grpc.DialOption{
		grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
	}
	switch *mode {
	case "kubelet":
	case "percent":
		opts = append(opts, grpc.WithAuthority(url.QueryEscape(*sock)))
	case "localhost":
		opts = append(opts, grpc.WithAuthority("localhost"))
	default:
		fail("unknown -authority %s", *mode)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *sock, opts...)
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()

	res := map[string]interface{}{"authority_mode": *mode}
	empty := []byte{}
	var resp []byte
	if err := conn.Invoke(ctx, "/v1beta1.DevicePlugin/GetDevicePluginOptions", &empty, &resp); err != nil {
		fail("GetDevicePluginOptions: %v", err)
	}
	res["options_bytes"] = len(resp)

	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/v1beta1.DevicePlugin/ListAndWatch")
	if err != nil {
		fail("ListAndWatch: %v", err)
	}
	if err := stream.SendMsg(&empty); err != nil {
		fail("ListAndWatch send: %v", err)
	}
	if err := stream.CloseSend(); err != nil {
		fail("ListAndWatch close: %v", err)
	}
	var first []byte
	if err := stream.RecvMsg(&first); err != nil {
		fail("ListAndWatch recv: %v", err)
	}
	res["list_and_watch_has_device"] = bytes.Contains(first, []byte(*device))

	id := []byte(*device)
	pref := field(1, append(field(1, id), 0x18, 1))
	if err := conn.Invoke(ctx, "/v1beta1.DevicePlugin/GetPreferredAllocation", &pref, &resp); err != nil {
		fail("GetPreferredAllocation: %v", err)
	}
	res["preferred_has_device"] = bytes.Contains(resp, id)

	alloc := field(1, field(1, id))
	if err := conn.Invoke(ctx, "/v1beta1.DevicePlugin/Allocate", &alloc, &resp); err != nil {
		fail("Allocate: %v", err)
	}
	res["allocate_has_device"] = bytes.Contains(resp, id)
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}
