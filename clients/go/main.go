// Command payments-go-client is an example Go caller of the Payments API and a contract test: it
// speaks native gRPC (h2c) to Envoy with stubs generated from proto/payments/v1/payments.proto by
// the pinned protoc-gen-go and protoc-gen-go-grpc (gen.sh), and walks one scenario: register, log
// in, create a payment, get it, list it, confirm it as an admin, and read a typed error (another
// customer's payment: NOT_FOUND with the ErrorInfo reason PAYMENT_NOT_FOUND). Each step prints
// one JSON line; any surprise exits 1.
//
//	./gen.sh && PAYMENTS_ADMIN_PASSWORD=... go run . -target 127.0.0.1:8080 -admin admin@example.com
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "payments/clients/go/paymentsv1"
)

const password = "correct horse battery"

func main() {
	target := flag.String("target", "127.0.0.1:8080", "Envoy's host:port (REST and gRPC)")
	adminEmail := flag.String("admin", "", "an admin's email; the password comes from PAYMENTS_ADMIN_PASSWORD")
	flag.Parse()
	if err := run(*target, *adminEmail, os.Getenv("PAYMENTS_ADMIN_PASSWORD")); err != nil {
		fmt.Fprintln(os.Stderr, "payments-go-client:", err)
		os.Exit(1)
	}
}

// step prints what a step saw, as one JSON object on a line of its own.
func step(name string, fields map[string]any) {
	fields["step"] = name
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
}

// bearer is ctx carrying the token the way Envoy and the server read it.
func bearer(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func run(target, adminEmail, adminPassword string) error {
	if adminEmail == "" || adminPassword == "" {
		return fmt.Errorf("-admin and PAYMENTS_ADMIN_PASSWORD are required")
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	auth, payments := pb.NewAuthServiceClient(conn), pb.NewPaymentServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	customer := func(tag string) (string, string, error) {
		email := fmt.Sprintf("go-%s-%d@example.com", tag, time.Now().UnixNano())
		registered, err := auth.Register(ctx, &pb.RegisterRequest{Email: email, Password: password})
		if err != nil {
			return "", "", fmt.Errorf("register: %w", err)
		}
		step("register", map[string]any{"email": email, "user_id": registered.GetUserId(), "role": registered.GetRole()})
		login, err := auth.Login(ctx, &pb.LoginRequest{Email: email, Password: password})
		if err != nil {
			return "", "", fmt.Errorf("login: %w", err)
		}
		step("login", map[string]any{"token_type": login.GetTokenType(), "expires_in": login.GetExpiresIn()})
		return email, login.GetAccessToken(), nil
	}

	email, token, err := customer("buyer")
	if err != nil {
		return err
	}
	created, err := payments.CreatePayment(bearer(ctx, token), &pb.CreatePaymentRequest{Payment: &pb.Payment{
		Email: email, Amount: 150000, Currency: "IDR", Description: "Go client", RequestId: fmt.Sprintf("go-%d", time.Now().UnixNano()),
	}})
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	step("create", map[string]any{"id": created.GetId(), "status": created.GetStatus().String(), "amount": created.GetAmount()})

	got, err := payments.GetPayment(bearer(ctx, token), &pb.GetPaymentRequest{Id: created.GetId()})
	if err != nil {
		return fmt.Errorf("get: %w", err)
	}
	step("get", map[string]any{"id": got.GetId(), "status": got.GetStatus().String(), "description": got.GetDescription()})

	page, err := payments.ListPayments(bearer(ctx, token), &pb.ListPaymentsRequest{PageSize: 10})
	if err != nil {
		return fmt.Errorf("list: %w", err)
	}
	ids := []string{}
	for _, p := range page.GetPayments() {
		ids = append(ids, p.GetId())
	}
	if !slices.Contains(ids, created.GetId()) {
		return fmt.Errorf("list: %s is not among %v", created.GetId(), ids)
	}
	step("list", map[string]any{"ids": ids})

	admin, err := auth.Login(ctx, &pb.LoginRequest{Email: adminEmail, Password: adminPassword})
	if err != nil {
		return fmt.Errorf("admin login: %w", err)
	}
	confirmed, err := payments.ConfirmPayment(bearer(ctx, admin.GetAccessToken()), &pb.ConfirmPaymentRequest{Id: created.GetId()})
	if err != nil {
		return fmt.Errorf("confirm: %w", err)
	}
	step("confirm", map[string]any{"id": confirmed.GetId(), "status": confirmed.GetStatus().String()})

	// A typed error: the status code, and the reason from its google.rpc.ErrorInfo detail.
	_, otherToken, err := customer("other")
	if err != nil {
		return err
	}
	_, err = payments.GetPayment(bearer(ctx, otherToken), &pb.GetPaymentRequest{Id: created.GetId()})
	if err == nil {
		return fmt.Errorf("another customer read %s", created.GetId())
	}
	st := status.Convert(err)
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			step("error", map[string]any{"code": st.Code().String(), "reason": info.GetReason(), "domain": info.GetDomain(),
				"message": st.Message()})
			return nil
		}
	}
	if st.Code() == codes.Unknown {
		return fmt.Errorf("not a gRPC status: %w", err)
	}
	return fmt.Errorf("%s without an ErrorInfo detail: %s", st.Code(), st.Message())
}
